"""python3 .old/swi.py SECONDS (-m MODULE | SCRIPT) ARGS...: run with sys.setswitchinterval(SECONDS)."""
import runpy, sys
sys.setswitchinterval(float(sys.argv[1]))
if sys.argv[2] == "-m":
    mod = sys.argv[3]; sys.argv = [mod] + sys.argv[4:]
    runpy.run_module(mod, run_name="__main__", alter_sys=True)
else:
    path = sys.argv[2]; sys.argv = [path] + sys.argv[3:]
    runpy.run_path(path, run_name="__main__")
