"""hero_engine.lora: state, names, peft side, kohya export/import, and loading our files through
diffusers' own kohya path (StableDiffusionPipeline.load_lora_weights). Tiny models from configs only."""

import json
import logging
import os
from collections import OrderedDict

import pytest
import torch

import hero_engine.toy  # noqa: F401  (registers the toy LoRA family)
from hero_engine import lora as L

pytest.importorskip("peft")
diffusers = pytest.importorskip("diffusers")
from diffusers import UNet2DConditionModel  # noqa: E402

# SD1.5-shaped block types, tiny widths.
SD15_CFG = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
)
# SDXL-shaped: attention only in the deeper block, 2 layers per block, 2 transformer blocks, mid attention.
SDXL_CFG = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2), cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
)


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(123)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([10, 500])
    c = torch.randn(2, 7, 32, generator=g)
    return x, t, c


def make_unet(unet_config, seed=0):
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_config).eval()
    unet.requires_grad_(False)
    return unet


def run(unet, inputs):
    x, t, c = inputs
    with torch.no_grad():
        return unet(x, t, c).sample


def trained_unet(unet_config, rank=4, alpha=4.0, seed=0, up_std=0.3, family="sd15"):
    """A base UNet + peft LoRA with random non-zero up weights (as after training)."""
    unet = make_unet(unet_config, seed)
    base_sd = {k: v.clone() for k, v in unet.state_dict().items()}
    L.add_lora(unet, rank=rank, alpha=alpha, seed=seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for layer in L.lora_layers(unet).values():
            w = layer.lora_B["hero"].weight
            w.copy_(torch.randn(w.shape, generator=g) * up_std)
    return unet, base_sd


def fresh_unet(unet_config, base_sd):
    unet = UNet2DConditionModel(**unet_config).eval()
    unet.load_state_dict(base_sd)
    return unet


def rand_state(family="sd15", rank=4, alpha=4.0, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    st = L.LoraState(family=family, rank=rank)
    names = [f"down_blocks.0.attentions.0.transformer_blocks.0.attn1.{p}" for p in ("to_q", "to_k", "to_out.0")]
    for name in names[:n]:
        st.add(name, L.LoraModule(torch.randn(rank, 32, generator=g), torch.randn(48, rank, generator=g), alpha))
    return st


class LogCapture(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def diffusers_warnings():
    cap = LogCapture()
    logger = logging.getLogger("diffusers")
    logger.addHandler(cap)
    yield cap.messages
    logger.removeHandler(cap)


# ---------------------------------------------------------------------------------------------- state


def test_delta_is_alpha_over_r_up_down():
    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(4, 6, generator=g), torch.randn(5, 4, generator=g)
    m = L.LoraModule(down, up, 2.0)
    assert m.rank == 4 and m.scale == 0.5
    torch.testing.assert_close(m.delta(), 0.5 * up @ down)
    st = L.LoraState(OrderedDict(a=m), "toy", 4)
    torch.testing.assert_close(st.delta("a"), 0.5 * up @ down)
    conv = L.LoraModule(torch.randn(4, 6, 1, 1, generator=g), torch.randn(5, 4, 1, 1, generator=g), 4.0)
    assert conv.delta().shape == (5, 6, 1, 1)
    with pytest.raises(L.LoraFormatError, match="rank mismatch"):
        L.LoraModule(torch.zeros(4, 6), torch.zeros(5, 3), 4.0)
    with pytest.raises(L.LoraFormatError, match="unknown family"):
        L.LoraState(family="sd3")


def test_init_state_for_the_comfy_side():
    shapes = {"input_blocks.1.1.transformer_blocks.0.attn1.to_q": (320, 320),
              "input_blocks.1.1.transformer_blocks.0.attn2.to_k": (320, 768)}
    kohya = {n: L.kohya_prefix(n) for n in shapes}  # SDXL: the LDM names (nodes/host_models.py)
    st = L.LoraState.init(shapes, rank=8, alpha=8.0, family="sdxl", kohya_names=kohya, seed=0)
    m = st["input_blocks.1.1.transformer_blocks.0.attn2.to_k"]
    assert m.down.shape == (8, 768) and m.up.shape == (320, 8) and not m.up.any()
    assert abs(m.down.std().item() - 1 / 8) < 0.01
    assert st.kohya_names["input_blocks.1.1.transformer_blocks.0.attn2.to_k"] == \
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k"
    with pytest.raises(L.LoraFormatError, match="rank"):
        L.LoraState(OrderedDict(a=L.LoraModule(torch.zeros(2, 3), torch.zeros(3, 2), 1.0)), "toy", 4)


def test_session_checkpoint_roundtrip_is_exact(tmp_path):
    st = rand_state("toy", alpha=0.3)  # 0.3 is not exact in fp32: must still survive
    st.kohya_names[next(iter(st))] = "lora_unet_custom_name"
    # the session's form (its lora.pt)
    for again in (L.LoraState.from_tensors(st.to_tensors(), st.header()), L.LoraState.from_tensors(st.to_tensors())):
        assert list(again) == list(st) and again.kohya_names == st.kohya_names and again.family == "toy"
        assert all(torch.equal(again.delta(n), st.delta(n)) and again[n].alpha == 0.3 for n in st)
    with pytest.raises(L.LoraFormatError, match="header"):
        L.LoraState.from_tensors({"a.down": torch.zeros(1, 1)})
    # through a session on disk, exactly
    from hero_engine.session import BestRecord, HeroConfig, Session
    s = Session.create(tmp_path / "s", HeroConfig(batch_size=2, steps=1))
    assert s.load_lora() is None
    s.complete_round(0, {"lora": L.session_tensors(st)}, {"round": 0}, BestRecord(0, 0), 2)
    back = Session.open(s.path).load_lora()
    assert list(back) == list(st) and back.family == "toy" and back.rank == 4
    assert back.kohya_names == st.kohya_names
    for n in st:
        assert torch.equal(back[n].down, st[n].down) and torch.equal(back[n].up, st[n].up)
        assert back[n].alpha == 0.3 and back[n].down.dtype == torch.float32


def test_sessions_from_older_versions_still_open(tmp_path):
    """Before the session stored a LoraState, the ComfyUI adapter stored {module.down|up|alpha}
    with the family and kohya names in session.json (info.lora_layout), and the diffusers backend
    stored its peft parameters: both still read, with the same tensors and names."""
    from hero_engine.session import BestRecord, HeroConfig, Session
    ldm = ["input_blocks.1.1.transformer_blocks.0.attn1.to_q", "input_blocks.1.1.transformer_blocks.0.attn2.to_k"]
    kohya = {n: L.kohya_prefix(n) for n in ldm}
    g = torch.Generator().manual_seed(0)
    old = {}
    for n in ldm:
        old[f"{n}.down"] = torch.randn(4, 8, generator=g)
        old[f"{n}.up"] = torch.randn(16, 4, generator=g)
        old[f"{n}.alpha"] = torch.tensor(2.0)
    s = Session.create(tmp_path / "comfy", HeroConfig(batch_size=2, steps=1))
    s.update_info(lora_layout={"family": "sdxl", "kohya": kohya, "rank": 4, "alpha": 2.0, "model": "SDXL"})
    s.complete_round(0, {"lora": old}, {"round": 0}, BestRecord(0, 0), 2)
    st = Session.open(s.path).load_lora()
    assert list(st) == ldm and st.family == "sdxl" and st.rank == 4 and st.base_model == "SDXL"
    assert st.kohya_names == kohya
    assert all(torch.equal(st[n].down, old[f"{n}.down"]) and st[n].alpha == 2.0 for n in ldm)
    # an older ComfyUI session without its layout cannot be named
    s2 = Session.create(tmp_path / "nolayout", HeroConfig(batch_size=2, steps=1))
    s2.complete_round(0, {"lora": old}, {"round": 0}, BestRecord(0, 0), 2)
    with pytest.raises(L.LoraFormatError, match="family"):
        s2.load_lora()
    # the diffusers backend's peft parameters: the backend's alpha and family
    unet, _ = trained_unet(SD15_CFG, rank=4, alpha=2.0)
    peft_old = {n: p.detach().float().clone() for n, p in unet.named_parameters() if ".lora_" in n}
    ref = L.state_from_peft(unet, "toy")
    back = L.read_session_lora(peft_old, family="toy", alpha=2.0)
    assert list(back) == list(ref) and back.kohya_names == ref.kohya_names and back.family == "toy"
    assert all(torch.equal(back.delta(n), ref.delta(n)) for n in ref)
    s3 = Session.create(tmp_path / "toy", HeroConfig(batch_size=2, steps=1, lora_alpha=2.0))
    s3.complete_round(0, {"lora": peft_old}, {"round": 0}, BestRecord(0, 0), 2)
    via = Session.open(s3.path).load_lora(family="toy")
    assert all(torch.equal(via.delta(n), ref.delta(n)) for n in ref)
    # ... and the backend loads them as it did
    from tiny import tiny_backend
    be = tiny_backend()
    with torch.no_grad():
        for p in be.lora_parameters().values():
            p.add_(0.01)
    params = {n: p.detach().float().clone() for n, p in be.lora_parameters().items()}
    now = be.lora_tensors()
    be2 = tiny_backend()
    be2.load_lora_tensors(params)
    again = be2.lora_tensors()
    assert list(again) == list(now) and all(torch.equal(now[k], again[k]) for k in now)


# ---------------------------------------------------------------------------------------------- names


def test_ldm_diffusers_name_mapping_known_pairs():
    # SD1.5 / SDXL (layers_per_block = 2): well-known correspondences
    pairs = {
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": "input_blocks.1.1.transformer_blocks.0.attn1.to_q",
        "down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k": "input_blocks.5.1.transformer_blocks.0.attn2.to_k",
        "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_out.0": "input_blocks.8.1.transformer_blocks.9.attn2.to_out.0",
        "mid_block.attentions.0.transformer_blocks.0.attn1.to_v": "middle_block.1.transformer_blocks.0.attn1.to_v",
        "up_blocks.0.attentions.2.transformer_blocks.0.attn1.to_q": "output_blocks.2.1.transformer_blocks.0.attn1.to_q",
        "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": "output_blocks.3.1.transformer_blocks.0.attn1.to_q",
        "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_v": "output_blocks.11.1.transformer_blocks.0.attn2.to_v",
    }
    for d, l in pairs.items():
        assert L.diffusers_to_ldm(d, 2) == l
    with pytest.raises(ValueError):
        L.diffusers_to_ldm("down_blocks.0.resnets.0.conv1", 2)
    assert L.kohya_name(next(iter(pairs)), "sd15") == "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert L.kohya_name(next(iter(pairs)), "sdxl") == "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"


def test_decode_kohya_prefix_inverts_known_names():
    for name in ["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0",
                 "input_blocks.4.1.transformer_blocks.1.attn1.to_k",
                 "mid_block.attentions.0.proj_in", "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.0.proj",
                 "middle_block.1.transformer_blocks.0.attn2.to_v", "output_blocks.11.1.proj_out"]:
        assert L.decode_kohya_prefix(L.kohya_prefix(name)) == name


# ---------------------------------------------------------------------------------------------- peft


def test_add_lora_hero_init_and_identity(inputs):
    unet = make_unet(SD15_CFG)
    base = run(unet, inputs)
    params = L.add_lora(unet, rank=4, alpha=4.0, seed=7)
    layers = L.lora_layers(unet)
    # 4 transformer blocks (down 1, mid 1, up 2) x (attn1, attn2) x (q, k, v, out)
    assert len(layers) == 32 and len(params) == 64
    assert all(p.requires_grad for p in params)
    a = torch.cat([l.lora_A["hero"].weight.flatten() for l in layers.values()])
    assert abs(a.std().item() - 1 / 4) < 0.02 and abs(a.mean().item()) < 0.02  # A ~ N(0, (1/r)^2)
    assert all(l.lora_B["hero"].weight.abs().sum() == 0 for l in layers.values())  # B = 0
    assert all(l.scaling["hero"] == 1.0 for l in layers.values())
    torch.testing.assert_close(run(unet, inputs), base)  # starts as the identity
    # seed makes A reproducible
    unet2 = make_unet(SD15_CFG)
    L.add_lora(unet2, rank=4, alpha=4.0, seed=7)
    assert all(torch.equal(l.lora_A["hero"].weight, l2.lora_A["hero"].weight)
               for l, l2 in zip(layers.values(), L.lora_layers(unet2).values()))


def test_peft_state_roundtrip_reproduces_output(inputs):
    unet, base_sd = trained_unet(SD15_CFG, rank=4, alpha=2.0)
    ref = run(unet, inputs)
    st = L.state_from_peft(unet, "sd15")
    assert st.rank == 4 and len(st) == 32 and all(m.alpha == 2.0 for _, m in st.items())
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    assert name in st and st.kohya(name) == L.kohya_prefix(name)
    # the delta is what peft adds to the weight
    layer = L.lora_layers(unet)[name]
    torch.testing.assert_close(st.delta(name), layer.get_delta_weight("hero"))
    other = fresh_unet(SD15_CFG, base_sd)
    L.load_state_into_peft(other, st)  # creates the adapter on the state's modules
    torch.testing.assert_close(run(other, inputs), ref, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(ref, run(fresh_unet(SD15_CFG, base_sd), inputs), atol=1e-2)
    # a state that does not fit the model is refused with the offending names
    stray = L.LoraState.from_tensors(st.to_tensors())  # a copy
    stray.add("down_blocks.9.attentions.0.proj_in", L.LoraModule(torch.zeros(4, 8), torch.zeros(8, 4), 2.0))
    with pytest.raises(L.LoraFormatError, match="down_blocks.9"):
        L.load_state_into_peft(other, stray)
    partial = L.LoraState(OrderedDict(list(st.items())[:3]), "sd15", 4)
    with pytest.raises(L.LoraFormatError, match="have no module in the state"):
        L.load_state_into_peft(other, partial)


# ---------------------------------------------------------------------------------------------- files


REQUIRED_META = ["ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_base_model_version",
                 "ss_output_name", "ss_training_comment", "modelspec.sai_model_spec",
                 "modelspec.architecture", "modelspec.implementation", "modelspec.title", "modelspec.date",
                 "modelspec.prediction_type", "modelspec.trigger_phrase", "modelspec.usage_hint"]


def test_export_kohya_layout_and_metadata(tmp_path):
    from safetensors import safe_open

    st = rand_state("sd15", rank=4, alpha=2.0)
    p = tmp_path / "hero_s1_r08.safetensors"
    hero = {"hero_session_id": "s1", "hero_rounds": 8, "hero_marks_used": 96,
            "hero_prompts": ["a cat", "a dog"], "hero_pack_version": "0.1.0"}
    L.export_kohya(st, p, hero)
    with safe_open(str(p), "pt") as f:
        md = f.metadata()
        keys = set(f.keys())
        k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0"
        assert {f"{k}.lora_down.weight", f"{k}.lora_up.weight", f"{k}.alpha"} <= keys and len(keys) == 9
        assert f.get_tensor(f"{k}.lora_down.weight").shape == (4, 32)
        assert f.get_tensor(f"{k}.lora_up.weight").shape == (48, 4)
        assert f.get_tensor(f"{k}.lora_up.weight").dtype == torch.float16
        alpha = f.get_tensor(f"{k}.alpha")
        assert alpha.dim() == 0 and alpha.item() == 2.0
    for key in REQUIRED_META:
        assert isinstance(md.get(key), str), key
    assert md["ss_network_module"] == "networks.lora" and md["ss_network_dim"] == "4"
    assert md["ss_network_alpha"] == "2.0" and md["ss_base_model_version"] == "sd_v1"
    assert md["modelspec.sai_model_spec"] == "1.0.1"
    assert md["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert md["modelspec.prediction_type"] == "epsilon" and md["modelspec.trigger_phrase"] == ""
    assert md["modelspec.title"] == md["ss_output_name"] == "hero_s1_r08"
    assert md["hero_session_id"] == "s1" and md["hero_rounds"] == "8" and md["hero_marks_used"] == "96"
    assert json.loads(md["hero_prompts"]) == ["a cat", "a dog"]
    sdxl_md = L.kohya_metadata(rand_state("sdxl"), {"ss_network_dim": "999"})
    assert sdxl_md["ss_base_model_version"] == "sdxl_base_v1-0" and sdxl_md["ss_network_dim"] == "4"
    assert sdxl_md["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"


def test_export_load_roundtrip_fp32_exact_and_fp16_close(tmp_path):
    st = rand_state("sd15", alpha=3.0)
    L.export_kohya(st, tmp_path / "a32.safetensors", {}, dtype=torch.float32)
    back, md = L.load_kohya(tmp_path / "a32.safetensors")
    assert sorted(back) == sorted(st) and back.family == "sd15" and back.rank == 4
    assert back.kohya_names == {n: st.kohya(n) for n in st}
    for n in st:
        assert torch.equal(back[n].down, st[n].down) and torch.equal(back[n].up, st[n].up)
        assert back[n].alpha == 3.0
    L.export_kohya(st, tmp_path / "a16.safetensors", {})
    back16, _ = L.load_kohya(tmp_path / "a16.safetensors")
    for n in st:
        assert back16[n].down.dtype == torch.float32
        torch.testing.assert_close(back16[n].down, st[n].down, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(back16[n].delta(), st[n].delta(), rtol=2e-3, atol=2e-3)


def test_atomic_write_leaves_no_temp_and_keeps_old_file_on_failure(tmp_path, monkeypatch):
    p = tmp_path / "out" / "x.safetensors"
    L.export_kohya(rand_state(alpha=1.0), p, {})
    L.export_kohya(rand_state(alpha=2.0), p, {})  # overwrite
    assert os.listdir(p.parent) == ["x.safetensors"]
    assert L.load_kohya(p)[0].alpha == 2.0

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(L.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        L.export_kohya(rand_state(alpha=3.0), p, {})
    monkeypatch.undo()
    assert os.listdir(p.parent) == ["x.safetensors"]
    assert L.load_kohya(p)[0].alpha == 2.0


def _write(path, tensors, md=None):
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=md)
    return path


def test_bad_files_raise_lora_format_error_naming_the_file(tmp_path):
    k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    ok = {f"{k}.lora_down.weight": torch.zeros(4, 8), f"{k}.lora_up.weight": torch.zeros(8, 4),
          f"{k}.alpha": torch.tensor(4.0)}
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a safetensors file at all")
    cases = {
        junk: "not a safetensors file",
        _write(tmp_path / "noup.safetensors", {f"{k}.lora_down.weight": torch.zeros(4, 8)}): "missing up/down pair",
        _write(tmp_path / "rank.safetensors", {**ok, f"{k}.lora_up.weight": torch.zeros(8, 2)}): "rank mismatch",
        _write(tmp_path / "fam.safetensors", ok, {"ss_base_model_version": "flux1"}): "unknown family",
        _write(tmp_path / "te.safetensors", {**ok, "lora_te_text_model_x.alpha": torch.tensor(1.0)}): "text-encoder",
        _write(tmp_path / "dim.safetensors", ok, {"ss_network_dim": "8"}): "rank mismatch",
    }
    for path, problem in cases.items():
        with pytest.raises(L.LoraFormatError) as e:
            L.load_kohya(path)
        assert str(path) in str(e.value) and problem in str(e.value), str(e.value)
        assert isinstance(e.value, ValueError)
    with pytest.raises(FileNotFoundError):
        L.load_kohya(tmp_path / "absent.safetensors")
    # no metadata: the family comes from the names; an explicit family wins
    bare = _write(tmp_path / "bare.safetensors", ok)
    assert L.load_kohya(bare)[0].family == "sd15" and L.load_kohya(bare, family="toy")[0].family == "toy"


# ---------------------------------------------------------------------------------------------- diffusers


def tiny_pipeline(unet, tmp_path):
    """A real StableDiffusionPipeline around ``unet`` with a tiny CLIP text encoder, tokenizer and VAE."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    transformers = pytest.importorskip("transformers")

    tok_dir = tmp_path / "tokenizer"
    tok_dir.mkdir(exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "cat</w>": 3}
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = transformers.CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"))
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=32))
    vae = AutoencoderKL(block_out_channels=(32,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=32)
    scheduler = DDIMScheduler(clip_sample=False, set_alpha_to_one=False)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def assert_loaded_exactly(unet, st, adapter, dtype):
    """Every module of the state became a peft layer with our (dtype-rounded) weights and alpha/r."""
    layers = L.lora_layers(unet, adapter)
    assert len(layers) == len(st)
    by_kohya = {st.kohya(n): n for n in st}
    for lname, layer in layers.items():
        k = L.kohya_name(lname, st.family, unet.config.layers_per_block)
        m = st[by_kohya[k]]
        assert torch.equal(layer.lora_A[adapter].weight, m.down.to(dtype).float())
        assert torch.equal(layer.lora_B[adapter].weight, m.up.to(dtype).float())
        assert layer.scaling[adapter] == pytest.approx(m.alpha / m.rank)


def no_key_warnings(messages):
    # diffusers/peft say "led to unexpected keys" / "led to missing keys" when a key does not land
    bad = [m for m in messages if "unexpected keys" in m or "missing keys" in m or "not loaded" in m]
    assert not bad, bad


@pytest.mark.parametrize("alpha", [4.0, 2.0], ids=["alpha=rank", "alpha=2,rank=4"])
def test_kohya_export_loads_in_diffusers_pipeline(tmp_path, inputs, diffusers_warnings, alpha):
    """THE KEY TEST: peft model -> export_kohya (fp16) -> StableDiffusionPipeline.load_lora_weights
    gives the same UNet output; all keys land, alpha/r is honoured."""
    unet, base_sd = trained_unet(SD15_CFG, rank=4, alpha=alpha)
    ref = run(unet, inputs)
    st = L.state_from_peft(unet, "sd15")
    path = tmp_path / "hero.safetensors"
    L.export_kohya(st, path, {"hero_session_id": "t"})

    pipe = tiny_pipeline(fresh_unet(SD15_CFG, base_sd), tmp_path)
    base = run(pipe.unet, inputs)
    pipe.load_lora_weights(str(path), adapter_name="kohya")
    no_key_warnings(diffusers_warnings)
    assert_loaded_exactly(pipe.unet, st, "kohya", torch.float16)
    out = run(pipe.unet, inputs)
    assert (ref - base).abs().max() > 0.1  # the LoRA matters, so the comparison means something
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)  # fp16 weights
    # exactly what our peft model gives with the same fp16-rounded weights
    st16, _ = L.load_kohya(path)
    L.load_state_into_peft(unet, st16)
    torch.testing.assert_close(out, run(unet, inputs), atol=1e-5, rtol=1e-5)
    if alpha != 4.0:  # the scale is alpha/r = 0.5, not 1: a wrong alpha would be visible
        wrong = L.LoraState.from_tensors(st16.to_tensors())  # a copy
        for _, m in wrong.items():
            m.alpha = 4.0
        L.load_state_into_peft(unet, wrong)
        assert (run(unet, inputs) - out).abs().max() > 0.05


def test_kohya_fp32_export_loads_in_diffusers_exactly(tmp_path, inputs, diffusers_warnings):
    unet, base_sd = trained_unet(SD15_CFG, rank=4, alpha=2.0, seed=3)
    ref = run(unet, inputs)
    st = L.state_from_peft(unet, "sd15")
    L.export_kohya(st, tmp_path / "h32.safetensors", {}, dtype=torch.float32)
    from diffusers.loaders import StableDiffusionLoraLoaderMixin as Mixin

    other = fresh_unet(SD15_CFG, base_sd)
    sd, alphas = Mixin.lora_state_dict(str(tmp_path / "h32.safetensors"))
    Mixin.load_lora_into_unet(sd, alphas, other, adapter_name="k")
    no_key_warnings(diffusers_warnings)
    assert_loaded_exactly(other, st, "k", torch.float32)
    torch.testing.assert_close(run(other, inputs), ref, atol=1e-5, rtol=1e-5)


def test_sdxl_family_ldm_names_load_in_diffusers_and_back(tmp_path, inputs, diffusers_warnings):
    """SDXL exports use LDM names; diffusers' SDXL loader maps them back (unet_config) and matches."""
    from diffusers.loaders import StableDiffusionXLLoraLoaderMixin as XL

    unet, base_sd = trained_unet(SDXL_CFG, rank=4, alpha=2.0, seed=5)
    ref = run(unet, inputs)
    st = L.state_from_peft(unet, "sdxl")
    kohya = set(st.kohya_names.values())
    assert "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k" in kohya
    assert "lora_unet_middle_block_1_transformer_blocks_0_attn1_to_q" in kohya
    assert "lora_unet_output_blocks_2_1_transformer_blocks_0_attn1_to_out_0" in kohya
    path = tmp_path / "xl.safetensors"
    md = L.export_kohya(st, path, {})
    assert md["ss_base_model_version"] == "sdxl_base_v1-0"

    other = fresh_unet(SDXL_CFG, base_sd)
    sd, alphas = XL.lora_state_dict(str(path), unet_config=other.config)
    XL.load_lora_into_unet(sd, alphas, other, adapter_name="k")
    no_key_warnings(diffusers_warnings)
    assert_loaded_exactly(other, st, "k", torch.float16)
    torch.testing.assert_close(run(other, inputs), ref, atol=2e-2, rtol=2e-2)

    # our own loader: LDM-named state -> a diffusers UNet, matched through the kohya names
    back, _ = L.load_kohya(path)
    assert back.family == "sdxl" and "middle_block.1.transformer_blocks.0.attn1.to_q" in back
    mine = fresh_unet(SDXL_CFG, base_sd)
    L.load_state_into_peft(mine, back)
    torch.testing.assert_close(run(mine, inputs), run(other, inputs), atol=1e-5, rtol=1e-5)
