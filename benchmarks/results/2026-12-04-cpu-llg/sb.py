import sys, runpy, os
si = float(os.environ.get("SI", "0"))
if si:
    sys.setswitchinterval(si)
rows = os.environ.get("PFR")
if rows:
    import aiosched.executors.structured_output as so
    orig = so.StructuredOutputManager.__init__
    def init(self, *a, **k):
        orig(self, *a, **k); self.parallel_fill_rows = int(rows)
    so.StructuredOutputManager.__init__ = init
sys.argv = ["structured_bench.py"] + sys.argv[1:]
runpy.run_path("benchmarks/structured_bench.py", run_name="__main__")
