"""Image files -> patch features, for the estimators that work on patches (PatchCore and
anomaly clustering): one pipeline, so that both read images the same way.

:class:`PatchImages` is mixed into an estimator that declares the input parameters
(``backbone``, ``weights``, ``image_size``, ``resize_mode``), the patch parameters
(``layers``, ``patch_size``, ``per_layer_dim``, ``target_dim``) and the run options
(``batch_size``, ``num_workers``, ``device``, ``progress``). It loads the backbone once
(a loaded :class:`~anomalib_study.backbones.Backbone` is used as it is), lets a fitted model
check it (``_check_identity``), and collects the patch features of image files through
:func:`anomalib_study.patches.collect_patch_features`.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from anomalib_study.errors import ParameterError
from anomalib_study.patches import PatchFeatures

__all__ = ["PatchImages"]


class PatchImages:
    """The backbone and the patch features of an estimator on patches (see the module docstring)."""

    def _patch_maker(self) -> PatchFeatures:
        return PatchFeatures(self.layers, self.patch_size, self.per_layer_dim, self.target_dim)

    def _check_identity(self, backbone: Any) -> None:
        """A fitted model refuses another backbone here (nothing to check before fitting)."""

    def get_backbone(self):
        """The backbone object (loaded from its name the first time, then checked by
        ``_check_identity``: a fitted model refuses another backbone or weights)."""
        from anomalib_study.backbones import Backbone, load_backbone

        if getattr(self, "_backbone_module", None) is None:
            if isinstance(self.backbone, Backbone):
                module = self.backbone
            elif isinstance(self.backbone, str):
                module = load_backbone(
                    self.backbone,
                    weights=self.weights,
                    device=self.device,
                    image_size=self.image_size,
                    resize_mode=self.resize_mode,
                )
            else:
                raise ParameterError(f"backbone must be a registered name or a loaded Backbone, got {self.backbone!r}")
            self._check_identity(module)
            self._backbone_module = module
        return self._backbone_module

    def collect_patches(
        self, paths: Sequence[str | os.PathLike], desc: str = "patch features", **options: Any
    ) -> tuple[np.ndarray, tuple[int, int]]:
        """Patch features of image files: ``(features (n, h*w, D) float32, (h, w))``
        (``options``: ``errors``, ``precision``, as :func:`~anomalib_study.patches.iter_patch_features`
        takes them)."""
        from anomalib_study.patches import collect_patch_features

        return collect_patch_features(
            self.get_backbone(),
            list(paths),
            self._patch_maker(),
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            device=self.device,
            progress=self.progress,
            desc=desc,
            record=self._patch_cache_record(desc),
            **options,
        )

    def _patch_cache_record(self, desc: str) -> dict:
        """The dict :func:`~anomalib_study.patches.iter_patch_features` records the patch cache's use into,
        one per kind of extraction (``desc``), kept in ``patch_cache_`` for the report."""
        log = self.__dict__.setdefault("patch_cache_", {})
        log[desc] = {}
        return log[desc]

    def patch_cache_used(self) -> dict:
        """For the report: per kind of extraction, whether its patch features were read from the
        patch cache or extracted, and the key (empty before any extraction)."""
        return {desc: dict(used) for desc, used in getattr(self, "patch_cache_", {}).items()}
