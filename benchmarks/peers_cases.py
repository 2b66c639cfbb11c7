"""The cases timed by ``benchmarks/peers.py``: needlework and a peer at matched configurations.

Each builder returns ``(ours_step, peer_step, info)``: two zero-argument callables running one training step
(MIL: forward + loss + backward + Adam step) or one forward + backward (sparse convolution), and a dict of
parameter counts and correctness checks made before any timing; ``info["extra_steps"]`` (popped by the
runner) names further variants of our side to time alongside, e.g. the im2col sparse convolution.
``peer_step`` is None, and ``info["skipped"]`` says why, when the peer is not importable; our side is
timed regardless.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import needlework
from needlework.ops.rulebook import rulebook
from needlework.ops.sparse_conv import (
    choose_method,
    dense_submanifold_conv2d,
    neighbor_table,
    submanifold_conv2d,
)

Step = Callable[[], None]


def peer_version(dist: str) -> str | None:
    """Installed version of distribution ``dist``, None when absent."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def try_import(module: str) -> tuple[Any, str | None]:
    """``(module, None)`` or ``(None, reason)`` — a missing peer is skipped with a message, never an error."""
    try:
        return importlib.import_module(module), None
    except Exception as err:  # ImportError, or a peer whose own import fails (missing compiled library)
        return None, f"{module} not importable ({type(err).__name__}: {err}); pip install 'needlework[bench]'"


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# -- MIL ---------------------------------------------------------------------------------------------------
def _ours_mil(name: str, in_dim: int, hidden: int, tokens: dict[str, int], matched: bool) -> nn.Module:
    """Our model with one logit and BCE (torchmil's binary setting)."""
    if name == "abmil":
        model = needlework.create_model(
            "abmil", in_dim=in_dim, num_classes=1, embed_dim=hidden, attention_dim=128
        )
    elif name == "dsmil":
        model = needlework.create_model(
            "dsmil", in_dim=in_dim, num_classes=1, embed_dim=hidden, query_dim=128, value_transform=False
        )
    else:  # TransMIL; no dropout on either side
        model = needlework.create_model(
            "transmil",
            in_dim=in_dim,
            num_classes=1,
            dim=tokens["dim"],
            heads=tokens["heads"],
            num_landmarks=tokens["landmarks"],
            dropout=0.0,
            # matched: without the output projection and value convolution torchmil's layer omits
            residual_conv=not matched,
            out_projection=not matched,
        )
    model.multilabel = True
    return model


def _peer_mil(tm: Any, name: str, in_dim: int, hidden: int, tokens: dict[str, int]) -> nn.Module:
    embed = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU())
    if name == "abmil":
        return tm.models.ABMIL(in_shape=(in_dim,), att_dim=128, feat_ext=embed)
    if name == "dsmil":
        return tm.models.DSMIL(in_shape=(in_dim,), att_dim=128, feat_ext=embed)
    return tm.models.TransMIL(
        in_shape=(in_dim,),
        att_dim=tokens["dim"],
        n_heads=tokens["heads"],
        n_landmarks=tokens["landmarks"],
        dropout=0.0,
    )


def _copy_weights(name: str, ours: nn.Module, peer: nn.Module) -> bool:
    """Give the peer our weights where the architectures coincide (ABMIL, DSMIL); False for TransMIL."""
    with torch.no_grad():
        if name == "abmil":
            peer.feat_ext[0].load_state_dict(ours.embed[0].state_dict())
            peer.pool.fc1.module.load_state_dict(ours.attention.tanh_branch[0].state_dict())
            peer.pool.fc2.weight.copy_(ours.attention.score.weight)  # its bias shifts every score: no effect
            peer.classifier.module.load_state_dict(ours.classifier.state_dict())  # LazyLinear wraps .module
            return True
        if name == "dsmil":
            peer.feat_ext[0].load_state_dict(ours.embed[0].state_dict())
            peer.q_nn.load_state_dict(ours.query.state_dict())
            peer.inst_classifier.load_state_dict(ours.instance_classifier.state_dict())
            peer.bag_classifier.weight.copy_(ours.bag_classifier.weight.view(1, -1))
            peer.bag_classifier.bias.copy_(ours.bag_classifier.bias)
            return True
    return False


def mil_case(
    name: str,
    n: int,
    in_dim: int = 1024,
    hidden: int = 256,
    tokens: dict[str, int] | None = None,
    matched: bool = True,
    seed: int = 0,
    batch: int = 1,
) -> tuple[Step, Step | None, dict]:
    """``batch`` bags of up to ``n`` instances ``(batch, n, in_dim)``; Adam on both sides.

    One bag has label 1. With ``batch > 1`` the labels alternate and the bags have lengths drawn in
    ``[n/2, n]``, zero-padded with a padding mask (``True`` = real instance) given to both sides; TransMIL
    gets full bags instead, since torchmil's ``TransMIL`` takes no mask.

    ABMIL / DSMIL embed to ``hidden``; TransMIL uses ``tokens`` (``dim``, ``heads``, ``landmarks``; default
    the reference's 512, 8, 256) and, with ``matched=False``, keeps the reference's output projection and
    value convolution that torchmil omits."""
    tokens = tokens or {"dim": 512, "heads": 8, "landmarks": 256}
    torch.manual_seed(seed)
    bag = torch.randn(batch, n, in_dim)
    target = (torch.arange(batch) % 2 == 0).float()  # 1, 0, 1, …
    mask = None
    if batch > 1 and name != "transmil":
        lengths = torch.randint(n // 2, n + 1, (batch,))
        lengths[0] = n
        mask = torch.arange(n) < lengths[:, None]  # (batch, n)
        bag = bag * mask[..., None]
    ours = _ours_mil(name, in_dim, hidden, tokens, matched).train()
    opt = torch.optim.Adam(ours.parameters(), lr=1e-4)

    def ours_step() -> None:
        opt.zero_grad(set_to_none=True)
        loss, _ = ours.compute_loss(ours(bag, mask=mask), target[:, None])
        loss.backward()
        opt.step()

    info: dict[str, Any] = {"params_ours": n_params(ours), "padded": mask is not None}
    tm, reason = try_import("torchmil.models")
    if tm is None:
        info["skipped"] = reason
        return ours_step, None, info
    tm = importlib.import_module("torchmil")
    peer = _peer_mil(tm, name, in_dim, hidden, tokens).train()
    info["params_peer"] = n_params(peer)
    if _copy_weights(name, ours, peer):
        with torch.no_grad():
            a = ours.eval()(bag, mask=mask)["logits"].flatten()
            b = (peer.eval()(bag) if mask is None else peer.eval()(bag, mask)).flatten()
        info["logit_max_abs_diff"] = float((a - b).abs().max())
        ours.train(), peer.train()
    peer_opt = torch.optim.Adam(peer.parameters(), lr=1e-4)

    def peer_step() -> None:
        peer_opt.zero_grad(set_to_none=True)
        _, losses = peer.compute_loss(target, bag) if mask is None else peer.compute_loss(target, bag, mask)
        sum(losses.values()).backward()
        peer_opt.step()

    return ours_step, peer_step, info


# -- sparse convolution ------------------------------------------------------------------------------------
def sparse_sites(layout: str, n_sites: int, side: int, seed: int = 0) -> torch.Tensor:
    """``(S, 3)`` ``(b, y, x)`` sites on one ``side × side`` map: ``scattered`` (uniform without replacement)
    or ``compact`` (the first ``n_sites`` cells of a square block, row-major)."""
    g = torch.Generator().manual_seed(seed)
    if layout == "scattered":
        flat = torch.randperm(side * side, generator=g)[:n_sites]
        y, x = flat // side, flat % side
    else:
        block = int(n_sites**0.5) + 1
        flat = torch.arange(n_sites)
        y, x = flat // block + (side - block) // 2, flat % block + (side - block) // 2
    return torch.stack([torch.zeros_like(y), y, x], dim=1)


def sparse_case(
    layout: str,
    channels: int,
    n_sites: int = 20_000,
    side: int = 512,
    reuse_table: bool = False,
    seed: int = 0,
) -> tuple[Step, Step | None, dict]:
    """One 3×3 submanifold conv ``C → C``, forward + backward to features and weight.

    ``reuse_table=False`` times building the neighbour table and rulebook (ours) / rulebook (spconv)
    inside every step; ``True`` builds it once, as a network with several layers on one site set does.
    Our side takes ``method="auto"`` (:func:`~needlework.ops.sparse_conv.choose_method`); the im2col path is
    timed as ``extra_steps["im2col"]`` (building only the table per step) so the rulebook's gain shows.
    """
    torch.manual_seed(seed)
    sites = sparse_sites(layout, n_sites, side, seed)
    feats = torch.randn(len(sites), channels, requires_grad=True)
    conv = nn.Conv2d(channels, channels, 3, padding=1)
    weight, bias = conv.weight, conv.bias
    grad_out = torch.randn(len(sites), channels)
    table = neighbor_table(sites, 3)
    book = rulebook(table, sites)  # with the sites: "auto" may take the dense-box path

    def ours_step() -> None:
        nbr = book if reuse_table else rulebook(neighbor_table(sites, 3), sites)
        out = submanifold_conv2d(feats, nbr, weight, bias)
        out.backward(grad_out)

    def im2col_step() -> None:
        nbr = table if reuse_table else neighbor_table(sites, 3)
        submanifold_conv2d(feats, nbr, weight, bias, method="im2col").backward(grad_out)

    info: dict[str, Any] = {"sites": len(sites), "extra_steps": {"im2col": im2col_step}}
    info["neighbor_fraction"] = book.fraction
    info["method"] = choose_method(book.fraction, len(sites), channels, book.box.fill)
    info["box_fill"] = round(book.box.fill, 4)
    ref = dense_submanifold_conv2d(feats.detach(), sites, weight.detach(), bias.detach())
    with torch.no_grad():
        ours_out = submanifold_conv2d(feats, book, weight, bias)
        im2col_out = submanifold_conv2d(feats, table, weight, bias, method="im2col")
    info["ours_vs_dense_max_abs_diff"] = float((ours_out - ref).abs().max())
    info["im2col_vs_dense_max_abs_diff"] = float((im2col_out - ref).abs().max())
    sp, reason = try_import("spconv.pytorch")
    if sp is None:
        info["skipped"] = reason
        return ours_step, None, info
    from needlework.ops.spconv_backend import import_spconv

    sp = import_spconv()  # patched for CPU backward (ENVIRONMENT.md §5.1)
    layer = sp.SubMConv2d(channels, channels, 3, padding=1, bias=True, indice_key="subm")
    with torch.no_grad():
        layer.weight.copy_(weight.permute(0, 2, 3, 1))  # spconv: (C_out, kh, kw, C_in)
        layer.bias.copy_(bias)
    indices = sites.int().contiguous()
    base = sp.SparseConvTensor(feats, indices, [side, side], 1)
    with torch.no_grad():
        peer_out = layer(base).features  # also leaves the rulebook in base.indice_dict
    info["spconv_vs_dense_max_abs_diff"] = float((peer_out - ref).abs().max())

    def peer_step() -> None:
        x = (
            base.replace_feature(feats)
            if reuse_table
            else sp.SparseConvTensor(feats, indices, [side, side], 1)
        )
        layer(x).features.backward(grad_out)

    return ours_step, peer_step, info


# -- ATS training step against its own feature network --------------------------------------------------
def ats_case(size: int = 1500, batch: int = 16) -> tuple[Step, Step, dict]:
    """An ATS training step (``ats.megapixel_mnist``: attention on ``x_low``, 10 patches of 50² sampled per
    image, features, expectation, classifier, loss, Adam) against the part no implementation can avoid:
    its feature network's forward + backward on the same number of patches. ``ratio`` = feature network /
    step (the goal: the step within 1.2× of the feature network, a ratio of at least 0.83)."""
    from ats_vs_dense import megapixel_batch  # the same images as benchmarks/ats_vs_dense.py

    torch.manual_seed(0)
    x_high, x_low, label = megapixel_batch(size, batch)
    model = needlework.create_model("ats.megapixel_mnist", num_classes=10)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sampler = model.sampler
    patch = sampler.patch_size if isinstance(sampler.patch_size, int) else sampler.patch_size[0]
    patches = torch.randn(batch * sampler.n_patches, x_high.shape[1], patch, patch)

    def ours_step() -> None:
        loss, _ = model.compute_loss(model(x_low, x_high), label)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def feature_step() -> None:
        sampler.feature_net(patches).sum().backward()

    def networks_step() -> None:  # both networks, nothing else: what the step costs beyond them is ATS's own
        (sampler.feature_net(patches).sum() + sampler.attention_net(x_low).sum()).backward()

    info = {"size": size, "batch": batch, "patches_per_image": sampler.n_patches, "patch": patch,
            "extra_steps": {"networks": networks_step}}  # fmt: skip
    return ours_step, feature_step, info


# -- ATS patch extraction against a plain copy of the same bytes ---------------------------------------
def extraction_case(
    size: int = 1500, batch: int = 16, n_patches: int = 64, patch: int = 50
) -> tuple[Step, Step, dict]:
    """``extract_patches`` (16 images of 1500², 64 patches of 50² each, offsets drawn so that some patches
    cross the border and are zero-padded) against ``copy_`` of a tensor with the output's shape: the floor
    for any implementation that writes the patches. ``ratio`` = copy / extraction (goal ≥ 0.5: within 2×).
    The result is first checked against a per-patch loop over a zero-padded image, the reference PyTorch
    port's way (METHODS §1.1), which is also timed (``port_loop``)."""
    import torch.nn.functional as F

    from needlework.ats import extract_patches

    gen = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 1, size, size, generator=gen)
    offsets = torch.randint(-patch // 2, size - patch // 2, (batch, n_patches, 2), generator=gen)
    source = torch.rand(batch, n_patches, 1, patch, patch, generator=gen)
    target = torch.empty_like(source)
    def port_step() -> torch.Tensor:  # the reference port's way: pad the whole batch, loop over patches
        padded = F.pad(images, (patch,) * 4)
        return torch.stack([
            torch.stack([padded[b, :, y + patch : y + 2 * patch, x + patch : x + 2 * patch]
                         for x, y in offsets[b].tolist()])
            for b in range(batch)
        ])  # fmt: skip

    want = port_step()
    exact = bool(torch.equal(extract_patches(images, offsets, patch), want))
    border = int(((offsets < 0) | (offsets > size - patch)).any(-1).sum())

    def ours_step() -> None:
        extract_patches(images, offsets, patch)

    def copy_step() -> None:
        target.copy_(source)

    inside = offsets.clamp(0, size - patch)  # the same patches moved inside: the border work left out

    def inside_step() -> None:
        extract_patches(images, inside, patch)

    info = {"size": size, "batch": batch, "n_patches": n_patches, "patch": patch, "output_bytes":
            source.numel() * source.element_size(), "border_patches": border, "exact": exact,
            "extra_steps": {"all_inside": inside_step, "port_loop": port_step}}  # fmt: skip
    return ours_step, copy_step, info
