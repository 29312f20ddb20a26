"""API-format graphs for server/browser tests."""
from __future__ import annotations


def stub_round_graph(ckpt: str, session_id: str = "test", batch: int = 4, size: int = 64,
                     steps: int = 2, seed: int = 0, marks: str = "", timeout: int = 600,
                     budget: int = 64) -> dict:
    """Checkpoint -> KSampler batch -> VAEDecode -> HERO_TestBatch -> HERO_Feedback -> HERO_TestFinish
    (the stand-in nodes of tests/support/stub_pack)."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red apple", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": batch}},
        "5": {"class_type": "KSampler", "inputs": {"seed": seed, "steps": steps, "cfg": 5.0,
                                                    "sampler_name": "euler", "scheduler": "normal",
                                                    "denoise": 1.0, "model": ["1", 0], "positive": ["2", 0],
                                                    "negative": ["3", 0], "latent_image": ["4", 0]}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "HERO_TestBatch", "inputs": {"images": ["6", 0], "session_id": session_id,
                                                          "budget": budget}},
        "8": {"class_type": "HERO_Feedback", "inputs": {"batch": ["7", 0], "images": ["6", 0],
                                                         "marks": marks, "timeout": timeout}},
        "9": {"class_type": "HERO_TestFinish", "inputs": {"feedback": ["8", 0]}},
    }
