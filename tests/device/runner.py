# Runs one firmware test module under the micropython unix port and prints one line per test:
#   @@MPTEST {"name": ..., "ok": true|false, "error": ..., "out": [...]}
# tests/support/mpcollect.py turns those lines into pytest items.
import sys
import json
import gc
import mptest


def main(path):
    name = path.rsplit("/", 1)[-1][:-3]
    d = path.rsplit("/", 1)[0]
    if d not in sys.path:
        sys.path.insert(0, d)
    try:
        mod = __import__(name)
    except Exception as e:  # import errors are reported as one failing item
        sys.print_exception(e)
        print(
            "@@MPTEST "
            + json.dumps({"name": "<import>", "ok": False, "error": "%s: %s" % (type(e).__name__, e)})
        )
        return
    names = sorted(n for n in dir(mod) if n.startswith("test_"))
    for n in names:
        fn = getattr(mod, n)
        mptest.OUT.clear()
        rec = {"name": n, "ok": True}
        try:
            fn()
        except mptest.Skip as e:
            rec["skip"] = str(e)
        except Exception as e:
            rec["ok"] = False
            rec["error"] = "%s: %s" % (type(e).__name__, e)
            sys.print_exception(e)
        if mptest.OUT:
            rec["out"] = list(mptest.OUT)
        gc.collect()
        print("@@MPTEST " + json.dumps(rec))


main(sys.argv[1])
