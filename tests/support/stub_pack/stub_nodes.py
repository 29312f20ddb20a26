# nodes/__init__.py of the throwaway test pack (copied by tests.support.stub_pack.build)
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import folder_paths
from comfy_api.latest import ComfyExtension, io

from ..hero_engine import session as S
from .feedback import HERO_Feedback, Feedback, Batch


@dataclass
class StubBatch:
    session: Any
    round: int
    size: int


class HERO_TestBatch(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="HERO_TestBatch", display_name="HERO test batch", category="HERO/test",
                         not_idempotent=True,
                         inputs=[io.Image.Input("images"), io.String.Input("session_id", default="test"),
                                 io.Int.Input("budget", default=64)],
                         outputs=[Batch.Output("batch")])

    @classmethod
    def fingerprint_inputs(cls, **kw):
        return float("nan")

    @classmethod
    def execute(cls, images, session_id, budget):
        n = int(images.shape[0])
        path = Path(folder_paths.get_output_directory()) / "hero" / session_id
        s = S.Session.open_or_create(path, S.HeroConfig(batch_size=n, budget=budget))
        round_idx = s.round
        d = s.round_dir(round_idx)
        if not (d / "meta.json").exists():
            arr = (images.clamp(0, 1) * 255).round().byte().cpu().numpy()
            from PIL import Image
            (d / "images").mkdir(parents=True, exist_ok=True)
            for i, a in enumerate(arr):
                Image.fromarray(a).save(s.image_path(round_idx, i))
            S.atomic_torch_save(d / "generated.pt", {})
            S.atomic_write_json(d / "meta.json", {"size": n})
        return io.NodeOutput(StubBatch(s, round_idx, n))


class HERO_TestFinish(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="HERO_TestFinish", display_name="HERO test finish", category="HERO/test",
                         is_output_node=True, not_idempotent=True,
                         inputs=[Feedback.Input("feedback")], outputs=[])

    @classmethod
    def fingerprint_inputs(cls, **kw):
        return float("nan")

    @classmethod
    def execute(cls, feedback):
        s, round_idx, m = feedback.session, feedback.round, feedback.marks
        n = len(m.good) + len(m.bad)
        best = S.BestRecord(round_idx, m.best) if m.best is not None else s.best
        s.complete_round(round_idx, {}, {"round": round_idx, "labels": m.num_marked,
                                         "good": len(m.good), "good_rate": len(m.good) / n},
                         best, m.num_marked)
        return io.NodeOutput(ui={"text": [f"round {round_idx} done"]})


class _Ext(ComfyExtension):
    async def get_node_list(self):
        return [HERO_Feedback, HERO_TestBatch, HERO_TestFinish]


async def comfy_entrypoint():
    return _Ext()
