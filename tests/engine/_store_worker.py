"""Second process for the concurrency test (test_store.py): until STOP exists, open the session
(with leftover cleanup, as the HERO Session node does), read its summary and LoRA, and export it
under the session lock, exactly as the panel export does.

usage: python _store_worker.py SESSION_DIR OUT_DIR RESULT_JSON
"""
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from hero_engine.session import Session, SessionError  # noqa: E402

torch.set_num_threads(1)
path, out, result = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
stop = path.parent / "STOP"


def write_lora(st, s, tag):
    from safetensors.torch import save_file
    if "lora" not in st:
        raise LookupError(s.round)  # fine before the first commit only
    f = out / f"{tag}_r{s.round:04d}.safetensors"
    tmp = f.with_suffix(".part")
    save_file({k: v.contiguous() for k, v in st["lora"].items()}, str(tmp))
    os.replace(tmp, f)
    return {"file": f.name}


(path.parent / "READY").write_text("")
counts = {"exports": 0, "summaries": 0, "opens_with_cleanup": 0, "no_lora_yet": 0}
errors = []
exports = []
i = 0
while not stop.exists():
    i += 1
    try:
        s = Session.open(path, cleanup=True)  # the node's open: may clean leftovers
        counts["opens_with_cleanup"] += 1
        d = s.summary()
        assert d["round"] == s.round
        counts["summaries"] += 1
        try:
            res = s.export_state(lambda st, s_: write_lora(st, s_, "proc"))
            counts["exports"] += 1
            exports.append(res["last_export"])
        except LookupError as e:
            counts["no_lora_yet"] += 1
            if e.args[0] != 0:
                errors.append(f"no LoRA in the state of round {e.args[0]}")
    except (SessionError, OSError, AssertionError) as e:
        errors.append(f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
    time.sleep(0.03)
result.write_text(json.dumps({"counts": counts, "errors": errors, "exports": exports}))
