"""Train the miniature text-to-image model on the procedural world (fixed seeds, resumable).

usage: python -m lab.train_model [--steps N] [--work out/miniworld-train] [--export PATH]
       python -m lab.train_model --start-from miniworld/weights/miniworld.safetensors \
           --striped-share 0.6 --steps 400 --lr 3e-4 --seed 1 --work out/finetune --export out/finetuned.safetensors
       (a fine-tuned copy for the benchmark's transfer test: the UNet trained further on shifted
       data, the text encoder kept, as many community checkpoints are made)
       python -m lab.train_model --world dit --steps 6000 --lr 5e-4 --work out/dit-train
       (the miniature Flux, miniworld/weights/miniworld_dit.safetensors)

The UNet world: epsilon-prediction diffusion on ComfyUI's own SD1 noise schedule; the DiT world:
flow matching with Flux's shift; both through ComfyUI's own `apply_model`, so what is learnt is
exactly what KSampler samples. The model and its text encoders (all but their frozen random token
embeddings) train together; 10% of captions are empty so
classifier-free guidance works. AdamW with warm-up and cosine decay, gradient clipping, an EMA of
the weights (what is shipped). Every `--checkpoint-every` steps the whole state goes to
<work>/state.safetensors (+ state.json), and a rerun continues from there; the loss log is
<work>/loss.csv. At the end the EMA weights are written in fp16 to --export.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import time
from collections.abc import Callable

import numpy as np
import torch

from lab.host import REPO, use_host
from miniworld.model import pictures_to_model_space


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", choices=("unet", "dit"), default="unet",
                        help="unet: the shipped SD1-class model; dit: the miniature Flux (miniworld.dit)")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--empty-share", type=float, default=0.1)
    parser.add_argument("--striped-share", type=float, default=0.25, help="share of striped scenes in the data")
    parser.add_argument("--start-from", default=None, help="fine-tune these weights (text encoder kept frozen)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-every", type=int, default=200)
    parser.add_argument("--work", default=os.path.join(REPO, "out", "miniworld-train"))
    parser.add_argument("--export", default=None, help="where the shipped weights go (default miniworld/weights/)")
    parser.add_argument("--comfyui", default=None)
    return parser.parse_args()


class CaptionTokens:
    """Token ids per caption, cached (the grammar has a few thousand distinct captions)."""

    def __init__(self, token_ids: Callable[[str], list[int]]) -> None:
        self.token_ids, self.cache = token_ids, {}

    def __call__(self, captions: list[str]) -> torch.Tensor:
        for text in captions:
            if text not in self.cache:
                self.cache[text] = self.token_ids(text)
        return torch.tensor([self.cache[text] for text in captions])


def batch(step: int, size: int, seed: int, empty_share: float, striped_share: float) -> tuple[torch.Tensor, list[str]]:
    from miniworld import world

    rng = np.random.default_rng([seed, step])
    scenes = [world.random_scene(rng, striped_share) for _ in range(size)]
    pictures = torch.from_numpy(np.stack([world.render(s, rng) for s in scenes]))
    captions = ["" if rng.random() < empty_share else world.caption(s, rng) for s in scenes]
    return pictures, captions


def learning_rate(step: int, args: argparse.Namespace) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


class UNetWorld:
    """The shipped UNet world: epsilon prediction on SD1's noise schedule, through ComfyUI's
    `BaseModel.apply_model`, so what is learnt is exactly what KSampler samples."""

    def __init__(self, args: argparse.Namespace) -> None:
        import safetensors.torch

        from miniworld import model

        self.world, self.export = model, args.export or model.MODEL_FILE
        self.model, self.clip = model.build_unet(), model.build_clip()
        text = model.text_transformer(self.clip)
        if args.start_from:
            model.load_model_state(self.model, self.clip, safetensors.torch.load_file(args.start_from))
        else:
            model.init_for_training_(self.model.diffusion_model, args.seed)
            model.init_for_training_(text.text_model.encoder, args.seed + 1)
            model.init_for_training_(text.text_model.final_layer_norm, args.seed + 2)
            model.init_for_training_(text.text_model.embeddings.position_embedding, args.seed + 3)
        self.params = dict(self.model.diffusion_model.named_parameters(prefix="unet"))
        train_text = not args.start_from
        if train_text:
            self.params.update({f"text.{k}": p for k, p in text.named_parameters() if not model.is_frozen(k)})
        for name, p in text.named_parameters():
            p.requires_grad_(train_text and not model.is_frozen(name))
        self.tokens = CaptionTokens(lambda text: model.token_ids(self.clip, text))

    def loss(self, pictures: torch.Tensor, captions: list[str], generator: torch.Generator) -> torch.Tensor:
        x0 = pictures_to_model_space(pictures)
        t = torch.randint(0, 1000, (x0.shape[0],), generator=generator)
        sigma = self.model.model_sampling.sigmas[t].float().reshape(-1, 1, 1, 1)
        noise = torch.randn(x0.shape, generator=generator)
        noisy = x0 + noise * sigma
        context = self.world.encode_ids(self.clip, self.tokens(captions))
        denoised = self.model.apply_model(noisy, sigma.flatten(), c_crossattn=context)
        return torch.nn.functional.mse_loss((noisy - denoised) / sigma, noise)

    def shipped_state(self) -> dict[str, torch.Tensor]:
        return self.world.model_state(self.model, self.clip)


class DiTWorld:
    """The miniature Flux (miniworld.dit): flow matching, the velocity (noise - picture) at a time
    drawn uniformly and shifted by the model's own sampling (Flux's shift), through ComfyUI's
    `Flux.apply_model` with T5 context and the pooled CLIP-L vector, as KSampler conditions it."""

    def __init__(self, args: argparse.Namespace) -> None:
        from miniworld import dit

        if args.start_from:
            raise SystemExit("--start-from fine-tunes the UNet world only")
        self.world, self.export = dit, args.export or dit.MODEL_FILE
        self.model, self.clip = dit.build_dit(), dit.build_clip()
        clip_l = dit.clip_l_transformer(self.clip).text_model
        for offset, module in enumerate((self.model.diffusion_model, dit.t5(self.clip), clip_l.encoder,
                                         clip_l.final_layer_norm, clip_l.embeddings.position_embedding)):
            dit.init_for_training_(module, args.seed + offset)
        self.params = dict(self.model.diffusion_model.named_parameters(prefix="dit"))
        for prefix, module in (("t5", dit.t5(self.clip)), ("clip_l", dit.clip_l_transformer(self.clip))):
            for name, p in module.named_parameters():
                p.requires_grad_(not dit.is_frozen_text(name))
                if p.requires_grad:
                    self.params[f"{prefix}.{name}"] = p
        self.t5_tokens = CaptionTokens(lambda text: dit.token_ids(self.clip, text)[0])
        self.clip_tokens = CaptionTokens(lambda text: dit.token_ids(self.clip, text)[1])
        from lab.pack_loader import pack_module

        self.saved_copies = pack_module("nodes.training").copies_of_saved_activations

    def loss(self, pictures: torch.Tensor, captions: list[str], generator: torch.Generator) -> torch.Tensor:
        x0 = pictures_to_model_space(pictures, self.world.CHANNELS)
        sigma = self.model.model_sampling.sigma(torch.rand(x0.shape[0], generator=generator)).reshape(-1, 1, 1, 1)
        noise = torch.randn(x0.shape, generator=generator)
        noisy = (1 - sigma) * x0 + sigma * noise
        context = self.world.encode_t5(self.clip, self.t5_tokens(captions))
        pooled = self.world.pooled_clip(self.clip, self.clip_tokens(captions))
        with self.saved_copies():  # ComfyUI's Flux blocks add their residuals in place
            denoised = self.model.apply_model(noisy, sigma.flatten(), c_crossattn=context, y=pooled)
        return torch.nn.functional.mse_loss((noisy - denoised) / sigma, noise - x0)

    def shipped_state(self) -> dict[str, torch.Tensor]:
        return self.world.model_state(self.model, self.clip)


def main() -> None:
    args = parse_args()
    use_host(args.comfyui)
    import safetensors.torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 0)) or os.cpu_count() or 2)
    os.makedirs(args.work, exist_ok=True)
    world = (DiTWorld if args.world == "dit" else UNetWorld)(args)
    world.model.train()
    params = world.params
    optimizer = torch.optim.AdamW(params.values(), lr=args.lr, weight_decay=0.01)
    ema = {k: p.detach().clone() for k, p in params.items()}

    state_path, info_path = os.path.join(args.work, "state.safetensors"), os.path.join(args.work, "state.json")
    start = 0
    if os.path.exists(info_path):
        saved = safetensors.torch.load_file(state_path)
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(saved[f"param/{k}"])
                ema[k].copy_(saved[f"ema/{k}"])
        start = int(saved["step"])
        for k, p in params.items():
            optimizer.state[p] = {"step": torch.tensor(float(start)), "exp_avg": saved[f"adam_m/{k}"].clone(),
                                  "exp_avg_sq": saved[f"adam_v/{k}"].clone()}
        print(f"resumed at step {start}", flush=True)

    generator = torch.Generator().manual_seed(args.seed)
    log = open(os.path.join(args.work, "loss.csv"), "a", newline="")
    writer = csv.writer(log)
    if start == 0:
        writer.writerow(["step", "loss", "lr", "seconds"])
    t0, running = time.time(), []
    for step in range(start, args.steps):
        generator.manual_seed(args.seed * 1_000_003 + step)
        pictures, captions = batch(step, args.batch, args.seed, args.empty_share, args.striped_share)
        loss = world.loss(pictures, captions, generator)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params.values(), 1.0)
        optimizer.step()
        with torch.no_grad():
            for k, p in params.items():
                ema[k].lerp_(p, 1 - args.ema)
        running.append(loss.item())
        if (step + 1) % 25 == 0:
            writer.writerow([step + 1, f"{np.mean(running):.5f}", f"{learning_rate(step, args):.2e}", f"{time.time() - t0:.1f}"])
            log.flush()
            print(f"step {step + 1}/{args.steps} loss {np.mean(running):.4f} {time.time() - t0:.0f}s", flush=True)
            running = []
        if (step + 1) % args.checkpoint_every == 0 or step + 1 == args.steps:
            state = {f"param/{k}": p.detach() for k, p in params.items()}
            state.update({f"ema/{k}": v for k, v in ema.items()})
            state.update({f"adam_m/{k}": optimizer.state[p]["exp_avg"] for k, p in params.items()})
            state.update({f"adam_v/{k}": optimizer.state[p]["exp_avg_sq"] for k, p in params.items()})
            state["step"] = torch.tensor(step + 1)
            safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, state_path + ".tmp")
            os.replace(state_path + ".tmp", state_path)
            with open(info_path, "w") as f:
                json.dump({"step": step + 1, "args": vars(args)}, f)
    log.close()

    with torch.no_grad():
        for k, p in params.items():
            p.copy_(ema[k])
    shipped = {k: v.detach().half().contiguous() for k, v in world.shipped_state().items()}
    os.makedirs(os.path.dirname(world.export), exist_ok=True)
    metadata = {"training": json.dumps({k: v for k, v in vars(args).items() if k not in ("work", "export", "comfyui")})}
    safetensors.torch.save_file(shipped, world.export, metadata=metadata)
    print(f"wrote {world.export} ({os.path.getsize(world.export) / 1e6:.1f} MB)", flush=True)


if __name__ == "__main__":
    main()
