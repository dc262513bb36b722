"""Training the reconstruction autoencoder: the epoch loop with early stopping, and the
per-epoch checkpoint a stopped fit resumes from exactly.

:class:`AutoEncoderTraining` is the part of :class:`~anomalib_study.methods.autoencoder.AutoEncoder`
that trains: Adam with a plateau learning-rate schedule (factor :data:`LR_FACTOR`), seeded
shuffling, the held-out validation loss after every epoch, early stopping after
``patience`` epochs without a lower one (the best epoch's weights kept), and, with
``checkpoint_dir``, a checkpoint written atomically after every epoch. A checkpoint records
a fingerprint (the trajectory-relevant parameters, the backbone weights, the decoded
training images' sha256) and is refused, naming what differs, by a fit it does not match.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from anomalib_study.errors import ModelFileError
from anomalib_study.io import as_json, atomic_write
from anomalib_study.methods.ae_decode import tensor_sha256
from anomalib_study.methods.ae_losses import reconstruction_loss

__all__ = ["AutoEncoderTraining", "CHECKPOINT_NAME", "CHECKPOINT_FORMAT", "LR_FACTOR", "RESUME_FREE"]

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = 1
LR_FACTOR = 0.5  # ReduceLROnPlateau factor
#: parameters that may change between an interrupted fit and its resume: they do not touch the trajectory
RESUME_FREE = ("epochs", "progress", "num_workers", "checkpoint_dir", "image_score", "thres_ratio")


class AutoEncoderTraining:
    """The training loop and checkpoints (mixed into AutoEncoder; see the module docstring)."""

    def _batches(self, order: torch.Tensor) -> list[torch.Tensor]:
        """``order`` cut into batches of ``batch_size``; a last batch of one image joins the one
        before (BatchNorm needs two values per channel at a 1x1 bottleneck)."""
        chunks = list(torch.split(order, int(self.batch_size)))
        if len(chunks) > 1 and chunks[-1].numel() == 1:
            chunks[-2:] = [torch.cat(chunks[-2:])]
        return chunks

    def _validation_loss(
        self, network: nn.Module, images: torch.Tensor, val_idx: np.ndarray, device, precision: str
    ) -> float:
        """Mean loss over the held-out images (eval mode: BatchNorm running statistics)."""
        network.eval()
        total = 0.0
        with torch.no_grad():
            for chunk in torch.split(torch.from_numpy(val_idx), int(self.batch_size)):
                x = self._unit(images[chunk], device)
                with self._autocast(device, precision):
                    reconstructions = network(x)
                total += float(reconstruction_loss(reconstructions, x, self.loss, float(self.ssim_weight))) * len(chunk)
        return total / val_idx.size

    def _train(
        self,
        network: nn.Module,
        images: torch.Tensor,
        train_idx: np.ndarray,
        val_idx: np.ndarray,
        fingerprint: dict,
        device: torch.device,
        precision: str,
    ) -> dict:
        """The epoch loop with early stopping and checkpoints; returns the early-stopping state
        (best_weights, best_epoch, stopped_early, history, resumed_from_epoch, ...)."""
        optimizer = torch.optim.Adam([p for p in network.parameters() if p.requires_grad], lr=float(self.lr))
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=LR_FACTOR, patience=int(self.patience) // 2
        )
        generator = torch.Generator().manual_seed(int(self.seed))
        state = {
            "epoch": 0,
            "best_val": math.inf,
            "best_epoch": 0,
            "bad_epochs": 0,
            "stopped_early": False,
            "best_weights": None,
            "history": [],
        }
        path = Path(self.checkpoint_dir) / CHECKPOINT_NAME if self.checkpoint_dir is not None else None
        if path is not None and path.is_file():
            checkpoint = self._read_checkpoint(path, fingerprint)
            network.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            scheduler.load_state_dict(checkpoint["scheduler"])
            generator.set_state(checkpoint["rng"]["generator"])
            torch.set_rng_state(checkpoint["rng"]["torch"])
            state = {
                **checkpoint["early_stopping"],
                "epoch": int(checkpoint["epoch"]),
                "history": list(checkpoint["history"]),
            }
            if state["best_weights"] is None and state["best_epoch"] == state["epoch"]:
                state["best_weights"] = {k: v.detach().clone() for k, v in network.state_dict().items()}
        resumed_from = state["epoch"]
        train_positions = torch.from_numpy(train_idx)
        bar = tqdm(
            total=int(self.epochs),
            initial=resumed_from,
            desc=f"AutoEncoder ({self.model})",
            unit="epoch",
            disable=not self.progress,
        )
        try:
            for epoch in range(state["epoch"] + 1, int(self.epochs) + 1):
                if state["stopped_early"]:
                    break
                started = time.perf_counter()
                lr = float(optimizer.param_groups[0]["lr"])
                network.train()
                total = 0.0
                order = train_positions[torch.randperm(train_positions.numel(), generator=generator)]
                for chunk in tqdm(
                    self._batches(order), desc=f"epoch {epoch}", unit="batch", leave=False, disable=not self.progress
                ):
                    x = self._unit(images[chunk], device)
                    with self._autocast(device, precision):
                        reconstructions = network(x)
                    loss = reconstruction_loss(reconstructions, x, self.loss, float(self.ssim_weight))
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    total += float(loss.detach()) * len(chunk)
                train_loss = total / train_idx.size
                val_loss = self._validation_loss(network, images, val_idx, device, precision)
                scheduler.step(val_loss)
                if val_loss < state["best_val"]:
                    state.update(
                        best_val=val_loss,
                        best_epoch=epoch,
                        bad_epochs=0,
                        best_weights={k: v.detach().clone() for k, v in network.state_dict().items()},
                    )
                else:
                    state["bad_epochs"] += 1
                    state["stopped_early"] = state["bad_epochs"] >= int(self.patience)
                state["epoch"] = epoch
                state["history"].append(
                    {
                        "epoch": epoch,
                        "train_loss": train_loss,
                        "val_loss": val_loss,
                        "lr": lr,
                        "seconds": time.perf_counter() - started,
                    }
                )
                bar.set_postfix(train=f"{train_loss:.4f}", val=f"{val_loss:.4f}", lr=f"{lr:.1e}")
                bar.update(1)
                if path is not None:
                    self._write_checkpoint(path, fingerprint, network, optimizer, scheduler, generator, state)
        finally:
            bar.close()
        state["resumed_from_epoch"] = resumed_from
        return state

    def _fingerprint(self, images: torch.Tensor, identity: dict | None, precision: str) -> dict:
        """What a checkpoint must match: the trajectory-relevant parameters, the backbone
        weights and the sha256 of the decoded training images."""
        params = {k: v for k, v in self.get_params().items() if k not in RESUME_FREE}
        return as_json(
            {
                "params": params,
                "precision_used": precision,
                "backbone_weights_sha256": None if identity is None else identity["weights_sha256"],
                "images_shape": list(images.shape),
                "images_dtype": str(images.dtype),
                "images_sha256": tensor_sha256(images),
            }
        )

    @staticmethod
    def _write_checkpoint(path: Path, fingerprint: dict, network, optimizer, scheduler, generator, state) -> None:
        early_stopping = {
            key: state[key] for key in ("best_val", "best_epoch", "bad_epochs", "stopped_early", "best_weights")
        }
        if state["best_epoch"] == state["epoch"]:  # the best weights are the model's: do not write them twice
            early_stopping["best_weights"] = None
        payload = {
            "format": CHECKPOINT_FORMAT,
            "fingerprint": fingerprint,
            "epoch": state["epoch"],
            "model": network.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "early_stopping": early_stopping,
            "rng": {"generator": generator.get_state(), "torch": torch.get_rng_state()},
            "history": state["history"],
        }
        with atomic_write(path, "wb") as handle:  # a crash mid-save keeps the previous epoch's checkpoint
            torch.save(payload, handle)

    def _read_checkpoint(self, path: Path, fingerprint: dict) -> dict:
        advice = f"delete the folder {path.parent} or pass another checkpoint_dir"
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises many kinds for a corrupt or foreign file
            raise ModelFileError(f"checkpoint {path} cannot be read ({error}): {advice}") from None
        if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
            raise ModelFileError(f"{path} is not an AutoEncoder checkpoint of format {CHECKPOINT_FORMAT}: {advice}")
        stored = checkpoint.get("fingerprint") or {}
        if stored != fingerprint:
            stored_params, params = stored.get("params", {}), fingerprint["params"]
            changed = sorted(k for k in set(stored_params) | set(params) if stored_params.get(k) != params.get(k))
            changed += [k for k in fingerprint if k != "params" and stored.get(k) != fingerprint[k]]
            raise ModelFileError(
                f"checkpoint {path} was made by a fit with other parameters or images (differs in: "
                f"{', '.join(changed)}): {advice}"
            )
        if int(checkpoint["epoch"]) > int(self.epochs):
            raise ModelFileError(
                f"checkpoint {path} has already run {checkpoint['epoch']} epochs, more than "
                f"epochs={self.epochs}: pass epochs >= {checkpoint['epoch']}, or {advice}"
            )
        return checkpoint
