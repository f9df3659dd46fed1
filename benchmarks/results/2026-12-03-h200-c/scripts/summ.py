import json,os,glob,sys
O=sys.argv[1]
for f in sorted(glob.glob(O+"/h/bench_c256.json")+glob.glob(O+"/h/before/bench_c256.json")+glob.glob(O+"/si*/bench_c256.json")):
    d=json.load(open(f))["runs"]["async"]; e=d["engine"]; i=e.get("device_idle",{})
    print(f.replace(O,""), round(d["output_throughput"]), "idle", round(i.get("idle_share",0),3), "late_ms", round(i.get("host_late_ms",0)), "cad", round(i.get("host_cadence_ms_mean",0),3), "sched", round(e["schedule_ms_per_step"],3), "upd", round(e["update_ms_per_step"],3), "wait", round(e["wait_ms_per_step"],3))
    for k,v in i.get("by_kind",{}).items():
        print("   ",k, {a:round(b,3) for a,b in v.items() if a.endswith("mean") or a in("steps","gap_before_ms","host_late_ms","host_late_gaps")})
