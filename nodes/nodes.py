"""The HERO V3 nodes (thin: the work is in ``host.py`` and ``hero_engine``).

One queued prompt = one HERO round (DESIGN.md decision 1):
HERO_Session -> HERO_Generate -> HERO_Feedback -> HERO_Train (-> HERO_ExportLoRA).
Per-round nodes are ``not_idempotent`` with a NaN fingerprint so ComfyUI never serves them from
its cache (ComfyUI calls ``fingerprint_inputs(cls, **inputs)``; NaN never equals itself).
"""
from __future__ import annotations

import logging
from pathlib import Path

from comfy_api.latest import io, ui

from ..hero_engine.drawing import metrics_plot
from ..hero_engine.memory import MEMORY_SETTINGS, with_memory_settings
from ..hero_engine.policy import PolicyConfig
from ..hero_engine.representation import RepresentationConfig
from ..hero_engine.session import (HeroConfig, Session, SessionDamaged, SessionError,
                                   valid_session_id)
from .sockets import CATEGORY, Batch, Feedback, SessionT

log = logging.getLogger("HERO")


def _nan(cls, **_inputs):
    """``fingerprint_inputs``: ComfyUI calls it as a classmethod with the node's inputs as
    keywords; NaN != NaN, so the node is never served from the cache."""
    return float("nan")


def sessions_root() -> Path:
    import folder_paths
    return Path(folder_paths.get_output_directory()) / "hero"


def _linked(prompt: dict, ref):
    """``["7", 0]`` (a link in an API-format prompt) -> node "7", else None."""
    if isinstance(ref, (list, tuple)) and len(ref) == 2 and isinstance(prompt, dict):
        n = prompt.get(str(ref[0]))
        return n if isinstance(n, dict) else None
    return None


def _text_of(prompt: dict, ref, depth: int = 0):
    """The prompt text behind a CONDITIONING link: the first string ``text`` (or ``text_g``,
    ``value``, ``string``) found walking up conditioning/text links (CLIPTextEncode, the SDXL
    encoders, primitive string nodes, conditioning combiners), or None."""
    node = _linked(prompt, ref)
    if node is None or depth > 12:
        return None
    ins = node.get("inputs") or {}
    for key in ("text", "text_g", "value", "string", "prompt"):
        v = ins.get(key)
        if isinstance(v, str) and v.strip():
            return v.strip()
        if isinstance(v, (list, tuple)):
            t = _text_of(prompt, v, depth + 1)
            if t:
                return t
    for key in ("conditioning", "conditioning_1", "conditioning_to", "positive", "negative"):
        if key in ins:
            t = _text_of(prompt, ins[key], depth + 1)
            if t:
                return t
    return None


def _checkpoint_of(prompt: dict, ref, depth: int = 0):
    """The checkpoint (or diffusion model) file behind a MODEL link, walking up ``model``
    inputs (LoRA loaders, patches): ``ckpt_name`` / ``unet_name``, or None."""
    node = _linked(prompt, ref)
    if node is None or depth > 32:
        return None
    ins = node.get("inputs") or {}
    for key in ("ckpt_name", "unet_name", "model_name"):
        if isinstance(ins.get(key), str):
            return ins[key]
    return _checkpoint_of(prompt, ins.get("model"), depth + 1)


def trace_workflow(prompt, unique_id) -> dict:
    """What HERO Generate's inputs come from in the queued graph: the positive and negative
    prompt text and the base checkpoint's file name (for the exported LoRA's card); {} when the
    graph is not at hand. Never raises."""
    try:
        me = (prompt or {}).get(str(unique_id)) or {}
        ins = me.get("inputs") or {}
        out = {"prompt": _text_of(prompt, ins.get("positive")),
               "negative": _text_of(prompt, ins.get("negative")),
               "checkpoint": _checkpoint_of(prompt, ins.get("model"))}
        return {k: v for k, v in out.items() if v}
    except Exception:  # noqa: BLE001 - a card detail must never fail a round
        log.debug("HERO: could not read the workflow", exc_info=True)
        return {}


def runs_before_train(prompt, unique_id) -> bool:
    """True when the queued graph has a HERO Train but this node's session input does not come
    from it (nor its ``after`` input): ComfyUI then runs this output node first, before the
    round's training."""
    try:
        me = (prompt or {}).get(str(unique_id)) or {}
        ins = me.get("inputs") or {}
        if not any(isinstance(n, dict) and n.get("class_type") == "HERO_Train"
                   for n in prompt.values()):
            return False
        for key in ("session", "after"):
            src = _linked(prompt, ins.get(key))
            if src is not None and src.get("class_type") == "HERO_Train":
                return False
        return True
    except Exception:  # noqa: BLE001
        return False


# config fields the HERO Session node shows under another widget name
_WIDGET_NAMES = {"guidance_scale": "cfg"}


def _config_diff(a: HeroConfig, b: HeroConfig) -> list[str]:
    """The settings of ``b`` that an existing session ``a`` keeps its own value for (the memory
    settings are the machine's, not the session's: they always apply, so never listed)."""
    da, db = a.to_json(), b.to_json()
    skip = {f"policy.{k}" for k in MEMORY_SETTINGS}
    out = []
    for k in sorted(set(da) | set(db)):
        if isinstance(da.get(k), dict):
            out += [f"{k}.{kk}" for kk in sorted(da[k])
                    if da[k].get(kk) != db.get(k, {}).get(kk) and f"{k}.{kk}" not in skip]
        elif da.get(k) != db.get(k):
            out.append(_WIDGET_NAMES.get(k, k))
    return out


def memory_line(p: PolicyConfig) -> str:
    """One line saying how the update will fit the card."""
    mb = ("auto (sized from the free GPU memory; on a CPU 2)" if p.micro_batch == 0
          else str(p.micro_batch))
    return (f"update memory: micro-batch {mb}, chains on the {p.chains_on}, gradient "
            f"checkpointing {'on' if p.gradient_checkpointing else 'off'}, precision "
            f"{p.mixed_precision}, {'releases' if p.release_models else 'keeps'} the VAE and "
            f"text encoders while training")


def open_session(session_id: str, config: HeroConfig, repair: bool = False
                 ) -> tuple[Session, bool, list[str]]:
    """Open ``output/hero/<id>/`` or create it with ``config`` -> (session, created, ignored keys).
    A damaged session raises its error (naming the file and what repair restores) unless
    ``repair``: then ``hero_engine.repair`` restores the last complete state first."""
    try:
        valid_session_id(session_id)
    except SessionError as e:
        raise ValueError(str(e)) from None
    path = sessions_root() / session_id
    remains = path.is_dir() and any((path / n).exists() for n in ("session.init.json", "rounds"))
    if (path / "session.json").exists() or remains:
        try:
            s = Session.open(path)
        except SessionDamaged as e:
            if not repair:
                raise
            from ..hero_engine.repair import repair as do_repair
            rep = do_repair(path)
            log.warning("HERO: session %s repaired: %s (%s)", session_id, "; ".join(rep["actions"]),
                        e)
            s = Session.open(path)
        return s, False, _config_diff(s.config, config)
    config.validate()
    return Session.create(path, config, session_id=session_id, info={"host": "comfyui"}), True, []


class HERO_Session(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HERO_Session", display_name="HERO Session", category=CATEGORY,
            description=(
                "Opens the HERO session named session_id (or creates it with these settings) in "
                "ComfyUI's output folder, output/hero/<session_id>/. Every round, mark and the "
                "LoRA are stored there, so a restarted ComfyUI continues where it stopped. "
                "Settings only apply when the session is created; an existing session keeps its "
                "own (a note lists any widget that differs). The memory settings at the end "
                "(micro_batch to release_models) change no result and always apply."),
            not_idempotent=True,
            inputs=[
                io.String.Input("session_id", default="hero_session",
                                tooltip="Name of the session (1-64 letters, digits, _ or -). "
                                        "A new name starts a new session; an existing one resumes."),
                io.Combo.Input("method", options=list(HeroConfig.METHODS), default="hero",
                               tooltip="hero (our recipe: the paper's representation and "
                                       "guided noise, and a LoRA update that imitates every image "
                                       "marked good so far, graded by the representation; "
                                       "docs/benchmarks.md), hero-paper (the paper's settings: a "
                                       "DDPO step on the learned reward), hero-no-guidance, "
                                       "ddpo-binary, d3po or rwr-binary (baselines)."),
                io.Int.Input("batch_size", default=8, min=2, max=256,
                             tooltip="Images per round (HERO Generate may override per round)."),
                io.Int.Input("steps", default=20, min=1, max=200,
                             tooltip="DDIM sampling steps per image (HERO Generate may override)."),
                io.Float.Input("cfg", default=5.0, min=1.0, max=30.0, step=0.1,
                               tooltip="Classifier-free guidance scale (HERO Generate may override)."),
                io.Int.Input("lora_rank", default=4, min=1, max=128,
                             tooltip="Rank r of the LoRA on the attention projections "
                                     "(to_q/to_k/to_v/to_out) and the transformer feed-forward "
                                     "layers."),
                io.Float.Input("lora_alpha", default=4.0, min=0.01, max=256.0, step=0.01,
                               tooltip="LoRA alpha; the update is scaled by alpha / rank."),
                io.Float.Input("learning_rate", default=1e-3, min=1e-7, max=1e-1, step=1e-5,
                               tooltip="AdamW learning rate of the LoRA update."),
                io.Int.Input("timesteps_per_sample", default=5, min=1, max=200,
                             tooltip="DDPO methods (hero-paper, ddpo-binary, d3po): denoising "
                                     "steps trained per image per round (at most steps)."),
                io.Float.Input("beta", default=0.5, min=0.0, max=1.0, step=0.05,
                               tooltip="Best-image ratio: share of next round's noises centred on "
                                       "the best image's noise."),
                io.Float.Input("epsilon", default=0.1, min=0.0, max=1.0, step=0.01,
                               tooltip="Noise perturbation around the chosen noises (0 = copies)."),
                io.Int.Input("budget", default=512, min=2, max=100000,
                             tooltip="Feedback budget: total number of image marks for the session."),
                io.Int.Input("encoder_epochs", default=500, min=1, max=10000,
                             tooltip="Triplet-loss epochs of the representation network per round "
                                     "(the paper: 500; lower it on CPU)."),
                io.Int.Input("seed", default=0, min=0, max=2 ** 31 - 1, control_after_generate=False,
                             tooltip="Session seed: every round's noise is drawn from (seed, round), "
                                     "so an interrupted round redraws the same images."),
                io.Boolean.Input("repair", default=False, optional=True,
                                 tooltip="If the session folder is damaged (a state folder deleted "
                                         "by hand, a truncated file), restore its last complete "
                                         "state before opening it. Marks are never deleted (see "
                                         "docs/session_store.md). Off: a damaged session stops "
                                         "with a message naming the file."),
                io.Int.Input("update_steps", default=PolicyConfig.denoise_steps, min=1, max=10000,
                             optional=True,
                             tooltip="hero's LoRA update: denoising steps on the images marked "
                                     "good so far, per round (8 images a step). More steps learn "
                                     "more from each mark and take longer; lower it on CPU. The "
                                     "PPO/D3PO methods (hero-paper, ddpo-binary, d3po) ignore it."),
                # memory settings (hero_engine/memory.py): how the update fits the card. They
                # change no result, so they apply to an existing session too.
                io.Int.Input("micro_batch", default=0, min=0, max=64, optional=True,
                             tooltip="Images per backward pass of the LoRA update. 0 (auto): the "
                                     "largest that fits the free GPU memory, measured by two "
                                     "probe passes. Each optimizer step still averages 8 images, "
                                     "so this changes memory and speed, not what is learned. "
                                     "Applies to an existing session too."),
                io.Boolean.Input("gradient_checkpointing", default=False, optional=True,
                                 tooltip="Recompute the UNet's activations in the backward pass "
                                         "(ComfyUI's Train LoRA node does the same): much less "
                                         "memory, the update 1.3-1.6x slower. Turn it on for "
                                         "SDXL on 8-12 GB cards. Applies to an existing session "
                                         "too."),
                io.Combo.Input("chains_on", options=["cpu", "device"], default="cpu",
                               optional=True,
                               tooltip="Where the round's denoising chains wait during the "
                                       "update: cpu (in system memory, fp16, moved to the GPU a "
                                       "few images at a time) or device (all on the GPU: a little "
                                       "faster, 1-2 GiB more at SDXL size). Applies to an "
                                       "existing session too."),
                io.Combo.Input("mixed_precision", options=["auto", "no", "fp16", "bf16"],
                               default="auto", optional=True,
                               tooltip="Autocast of the UNet during the update; the LoRA "
                                       "weights stay fp32. auto: fp16 on a GPU, fp32 on CPU. "
                                       "Applies to an existing session too."),
                io.Boolean.Input("release_models", default=True, optional=True,
                                 tooltip="Unload the VAE and the text encoders from the GPU while "
                                         "the LoRA trains (they load again for the next batch, a "
                                         "few seconds). Applies to an existing session too."),
            ],
            outputs=[SessionT.Output("session", tooltip="The open session, for the other HERO nodes.")],
        )

    fingerprint_inputs = classmethod(_nan)

    @classmethod
    def execute(cls, session_id, method="hero", batch_size=8, steps=20, cfg=5.0, lora_rank=4,
                lora_alpha=4.0, learning_rate=1e-3, timesteps_per_sample=5, beta=0.5,
                epsilon=0.1, budget=512, encoder_epochs=500, seed=0, repair=False,
                update_steps=PolicyConfig.denoise_steps, micro_batch=0,
                gradient_checkpointing=False, chains_on="cpu", mixed_precision="auto",
                release_models=True) -> io.NodeOutput:
        session_id = str(session_id).strip()
        # cfg: the guidance scale, by the widget name that saved workflows use
        config = HeroConfig(method=method, batch_size=int(batch_size), steps=int(steps),
                            guidance_scale=float(cfg), beta=float(beta), epsilon=float(epsilon),
                            lora_rank=int(lora_rank), lora_alpha=float(lora_alpha),
                            budget=int(budget), seed=int(seed),
                            policy=PolicyConfig(lr=float(learning_rate),
                                                timesteps_per_sample=int(timesteps_per_sample),
                                                denoise_steps=int(update_steps)),
                            representation=RepresentationConfig(epochs=int(encoder_epochs)))
        memory = dict(micro_batch=int(micro_batch),
                      gradient_checkpointing=bool(gradient_checkpointing),
                      chains_on=str(chains_on), mixed_precision=str(mixed_precision),
                      release_models=bool(release_models))
        config = with_memory_settings(config, **memory)
        s, created, diff = open_session(session_id, config, repair=bool(repair))
        s.config = with_memory_settings(s.config, **memory)   # the machine's, not the session's
        lines = [f"session {s.session_id}: {'created' if created else 'resumed'}, round {s.round}, "
                 f"{s.marks_used}/{s.config.budget} labels used", memory_line(s.config.policy)]
        if diff:
            lines.append("kept the session's own settings for: " + ", ".join(diff))
            log.info("HERO: session %s keeps its settings (%s)", s.session_id, ", ".join(diff))
        if s.done:
            lines.append("the feedback budget is used up (further rounds still run)")
        return io.NodeOutput(s, ui=ui.PreviewText("\n".join(lines)))


class HERO_Generate(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HERO_Generate", display_name="HERO Generate", category=CATEGORY,
            description=(
                "Samples this round's batch with the session's current LoRA (stochastic DDIM with "
                "log-probs, feedback-guided initial noise) through ComfyUI's own guider, decodes it "
                "and stores it in the session. If the round's batch was already generated (e.g. "
                "before a restart) the same images are returned instead of new ones."),
            not_idempotent=True,
            inputs=[
                io.Model.Input("model", tooltip="SD1.5 or SDXL (epsilon) model; LoRAs loaded "
                                                "before HERO still apply."),
                io.Conditioning.Input("positive", tooltip="The prompt (CLIP Text Encode)."),
                io.Conditioning.Input("negative", tooltip="The negative prompt."),
                io.Vae.Input("vae", tooltip="VAE to decode the batch for marking."),
                SessionT.Input("session", tooltip="From HERO Session."),
                io.Int.Input("batch_size", default=0, min=0, max=256,
                             tooltip="Images this round; 0 = the session's batch_size."),
                io.Int.Input("steps", default=0, min=0, max=200,
                             tooltip="DDIM steps; 0 = the session's steps."),
                io.Float.Input("cfg", default=0.0, min=0.0, max=30.0, step=0.1,
                               tooltip="Guidance scale; 0 = the session's cfg."),
                io.Int.Input("width", default=512, min=64, max=4096, step=8,
                             tooltip="Image width in pixels (multiple of 8)."),
                io.Int.Input("height", default=512, min=64, max=4096, step=8,
                             tooltip="Image height in pixels (multiple of 8)."),
                io.Int.Input("seed", default=0, min=0, max=2 ** 63 - 1, control_after_generate=False,
                             tooltip="Passed to ComfyUI's sampler machinery and recorded with the "
                                     "round; the round's noise itself comes from the session seed "
                                     "and round number (reproducible after a restart)."),
            ],
            outputs=[io.Image.Output("images", tooltip="The decoded batch, in batch order."),
                     io.Latent.Output("latent", tooltip="The batch's latents."),
                     Batch.Output("batch", tooltip="The round, for HERO Feedback and HERO Train.")],
            hidden=[io.Hidden.prompt, io.Hidden.unique_id],
        )

    fingerprint_inputs = classmethod(_nan)

    @classmethod
    def execute(cls, model, positive, negative, vae, session, batch_size=0, steps=0, cfg=0.0,
                width=512, height=512, seed=0) -> io.NodeOutput:
        from . import host
        hidden = getattr(cls, "hidden", None)
        wf = trace_workflow(getattr(hidden, "prompt", None), getattr(hidden, "unique_id", None))
        # cfg: the guidance scale, by the widget name that saved workflows use
        b = host.generate(model, positive, negative, vae, session, batch_size, steps,
                          guidance_scale=cfg, width=width, height=height, seed=seed, workflow=wf)
        if b.reused:
            text = f"round {b.round}: the {b.size} images generated before (re-used)"
        else:
            secs = session.info.get("timing", {}).get("generate_seconds")
            text = f"round {b.round}: {b.size} images" + (f" in {secs:.1f} s" if secs else "")
        return io.NodeOutput(b.images, {"samples": b.latent}, b, ui=ui.PreviewText(text))


def phase_times(m: dict) -> str:
    """'took 41.2 s: representation 12.0 s, update 25.1 s' from a round's metrics."""
    parts = [(name, m.get(key)) for name, key in (("representation", "encoder_seconds"),
                                                  ("extra samples", "extra_seconds"),
                                                  ("update", "policy_seconds"))]
    inner = ", ".join(f"{n} {v:.1f} s" for n, v in parts if isinstance(v, (int, float)) and v > 0)
    total = m.get("train_seconds")
    head = f"took {total:.1f} s" if isinstance(total, (int, float)) else "took"
    return head + (f": {inner}" if inner else "")


class HERO_Train(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HERO_Train", display_name="HERO Train", category=CATEGORY,
            description=(
                "Learns from this round's marks: updates the best image and noise pool, trains the "
                "representation network on the good/bad/best triplets, computes rewards, and runs "
                "one PPO update of the LoRA inside ComfyUI's sampler machinery. The round is then "
                "committed to the session. Outputs the model with the updated LoRA (usable by any "
                "KSampler) and a metrics chart."),
            not_idempotent=True, is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="The same model as HERO Generate's."),
                SessionT.Input("session", tooltip="From HERO Session."),
                Feedback.Input("feedback", tooltip="The round's marks, from HERO Feedback."),
            ],
            outputs=[io.Model.Output("lora_model", display_name="model",
                                     tooltip="The model with the session's LoRA applied."),
                     io.Image.Output("metrics", tooltip="Marks used, good rate, triplet loss and "
                                                        "reward spread per round."),
                     SessionT.Output("session_out", display_name="session",
                                     tooltip="The session after this round's training: connect "
                                             "HERO Export LoRA (and the other exports) here, so "
                                             "they run after the training.")],
        )

    fingerprint_inputs = classmethod(_nan)

    @classmethod
    def execute(cls, model, session, feedback) -> io.NodeOutput:
        from . import host
        r = host.train(model, session, feedback)
        plot = metrics_plot(session.history)
        m = r.metrics
        text = r.message
        if r.trained:
            # the round's metrics keep their old key names ("labels", "labels_used": marks)
            text += (f": {m.get('labels')} marks ({m.get('labels_used')}/{session.config.budget}"
                     f" used), good rate {m.get('good_rate', 0):.2f}, policy loss "
                     f"{m.get('policy_loss', float('nan')):.3g}; {phase_times(m)}")
        return io.NodeOutput(r.model, plot, session, ui=ui.PreviewText(text))


class HERO_ApplyLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HERO_ApplyLoRA", display_name="HERO Apply LoRA", category=CATEGORY,
            description=("Applies the session's current LoRA (after its last completed round) to a "
                         "model, like Load LoRA, without exporting a file. Before the first "
                         "completed round the model passes through unchanged."),
            not_idempotent=True,
            inputs=[
                io.Model.Input("model", tooltip="The model the session was trained on."),
                SessionT.Input("session", tooltip="From HERO Session."),
                io.Float.Input("strength", default=1.0, min=-4.0, max=4.0, step=0.05,
                               tooltip="LoRA strength (1.0 = as trained)."),
            ],
            outputs=[io.Model.Output("lora_model", display_name="model",
                                     tooltip="The model with the session's LoRA.")],
        )

    fingerprint_inputs = classmethod(_nan)

    @classmethod
    def execute(cls, model, session, strength=1.0) -> io.NodeOutput:
        from . import host
        m, applied = host.apply_lora(model, session, strength)
        text = (f"session {session.session_id}: LoRA after {session.round} rounds, strength "
                f"{strength:g}" if applied else
                f"session {session.session_id} has no trained LoRA yet: model unchanged")
        return io.NodeOutput(m, ui=ui.PreviewText(text))


class HERO_ExportLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HERO_ExportLoRA", display_name="HERO Export LoRA", category=CATEGORY,
            description=(
                "Writes the session's LoRA as a kohya .safetensors file to "
                "models/loras/hero/<prefix>_r<round>.safetensors (family-native names, ss_*/"
                "modelspec/hero_* metadata, kohya hashes, the best image as thumbnail) and an "
                "A1111 <name>.json card beside it. It appears in Load LoRA's list and loads in "
                "A1111, Forge, kohya and diffusers. Connect its session to HERO Train's session "
                "output so it runs after the round's training. Before any round is trained it "
                "only shows a note; the round goes on."),
            not_idempotent=True, is_output_node=True,
            inputs=[
                SessionT.Input("session", tooltip="HERO Train's session output (the export then "
                                                  "follows the training), or HERO Session's."),
                io.String.Input("filename_prefix", default="hero",
                                tooltip="File name prefix (letters, digits, _ or -); the round "
                                        "number is appended."),
                io.Combo.Input("dtype", options=["fp16", "fp32"], default="fp16", optional=True,
                               tooltip="Tensor precision of the file."),
                io.Model.Input("after", optional=True,
                               tooltip="Optional (older workflows): HERO Train's model output, "
                                       "which also orders the export after the training."),
                io.String.Input("author", default="", optional=True,
                                tooltip="Your name for the file's modelspec.author (shown by "
                                        "model browsers)."),
            ],
            outputs=[io.String.Output("lora_name", tooltip="The file's name under models/loras "
                                                          "(for Load LoRA); empty when nothing "
                                                          "was exported.")],
            hidden=[io.Hidden.prompt, io.Hidden.unique_id],
        )

    fingerprint_inputs = classmethod(_nan)

    @classmethod
    def execute(cls, session, filename_prefix="hero", dtype="fp16", after=None,
                author="") -> io.NodeOutput:
        from . import host
        try:
            res = host.export_lora(session, filename_prefix, dtype, author=str(author or ""))
        except host.NothingToExport as e:
            log.info("HERO: %s", e)
            return io.NodeOutput("", ui=ui.PreviewText(f"nothing exported: {e}"))
        note = ""
        hidden = getattr(cls, "hidden", None)
        if after is None and runs_before_train(getattr(hidden, "prompt", None),
                                               getattr(hidden, "unique_id", None)):
            note = ("\nnote: this prompt's HERO Train had not run yet, so this is the LoRA "
                    "of the rounds before; connect HERO Train's session output here to export "
                    "after the training")
        return io.NodeOutput(res["filename"], ui=ui.PreviewText(
            f"wrote models/loras/{res['filename']} ({res['modules']} modules, round "
            f"{res['round']}) and its A1111 card {Path(res['sidecar']).name}{note}"))


class HERO_ExportPreferences(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HERO_ExportPreferences", display_name="HERO Export Preferences",
            category=CATEGORY,
            description=(
                "Writes the session's marks as a preference dataset: one JSON line per good-vs-"
                "bad pair of every marked round (prompt, chosen/rejected image paths, Pick-a-Pic "
                "style image_0/image_1/label_0/label_1, round, seed), to "
                "output/hero/<session>/exports/preferences_r<round>.jsonl, for offline DPO "
                "tools. Connect its session to HERO Train's session output. Without marks it "
                "only shows a note."),
            not_idempotent=True, is_output_node=True,
            inputs=[SessionT.Input("session", tooltip="HERO Train's session output, or HERO "
                                                      "Session's.")],
            outputs=[io.String.Output("path", tooltip="The dataset file (empty when nothing was "
                                                      "written).")],
        )

    fingerprint_inputs = classmethod(_nan)

    @classmethod
    def execute(cls, session) -> io.NodeOutput:
        from . import host
        try:
            res = host.export_preferences(session)
        except host.NothingToExport as e:
            return io.NodeOutput("", ui=ui.PreviewText(f"nothing exported: {e}"))
        return io.NodeOutput(res["path"], ui=ui.PreviewText(
            f"wrote output/{res['filename']}: {res['pairs']} good-vs-bad pairs from "
            f"{res['rounds']} rounds"))


class HERO_ExportNoise(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HERO_ExportNoise", display_name="HERO Export Noise Latent",
            category=CATEGORY,
            description=(
                "Writes the best image's initial noise and the good images' noises as "
                "input/hero_<session>_r<round>.latent, a file ComfyUI's Load Latent reads. In a "
                "plain workflow, Load Latent -> KSampler (Advanced) with add_noise disable and "
                "the normal or karras scheduler starts from these noises: HERO's feedback-"
                "guided start without HERO nodes. Without a best image it only shows a note."),
            not_idempotent=True, is_output_node=True,
            inputs=[SessionT.Input("session", tooltip="HERO Train's session output, or HERO "
                                                      "Session's."),
                    io.Int.Input("max_noises", default=16, min=1, max=256,
                                 tooltip="At most this many noises (the best first).")],
            outputs=[io.String.Output("latent_name", tooltip="The file's name in ComfyUI's "
                                                             "input folder (empty when nothing "
                                                             "was written).")],
        )

    fingerprint_inputs = classmethod(_nan)

    @classmethod
    def execute(cls, session, max_noises=16) -> io.NodeOutput:
        from . import host
        try:
            res = host.export_noise(session, int(max_noises))
        except host.NothingToExport as e:
            return io.NodeOutput("", ui=ui.PreviewText(f"nothing exported: {e}"))
        return io.NodeOutput(res["filename"], ui=ui.PreviewText(
            f"wrote input/{res['filename']}: {res['noises']} noises (best first), shape "
            f"{res['shape']}; load it with Load Latent"))


def _panel_export(session, body: dict) -> dict:
    """POST /hero/export (routes.SessionViews.export): ``kind`` "lora" (default), "preferences"
    or "noise"."""
    from . import host
    kind = body.get("kind", "lora")
    if kind == "preferences":
        return host.export_preferences(session)
    if kind == "noise":
        lim = body.get("max_noises", 16)
        if not isinstance(lim, int) or isinstance(lim, bool) or not 1 <= lim <= 256:
            raise host.HeroHostError("max_noises must be a whole number from 1 to 256")
        return host.export_noise(session, lim)
    if kind != "lora":
        raise host.HeroHostError(f"unknown export kind {kind!r}: use lora, preferences or noise")
    prefix = body.get("filename_prefix", body.get("prefix"))
    if prefix is None or prefix == "":
        prefix = session.session_id
    res = host.export_lora(session, prefix, body.get("dtype"))  # checked before anything loads
    res.pop("metadata", None)
    res.pop("last_export", None)
    return res


# this module's nodes (the tests walk them); the pack's node list, in ComfyUI's order, is
# nodes/__init__.py::node_list
NODES = [HERO_Session, HERO_Generate, HERO_Train, HERO_ApplyLoRA, HERO_ExportLoRA,
         HERO_ExportPreferences, HERO_ExportNoise]
