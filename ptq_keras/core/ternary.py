"""The math of sparse ternary projection: a numpy reference and its twin in ``keras.ops`` (one implementation for
tf_keras, Keras 3 on TensorFlow and Keras 3 on JAX).

A kernel is viewed as a matrix ``(n, C)``: column ``c`` holds the weights of output channel ``c`` (see
:func:`as_groups`). For each *selection group* (a column, or the whole matrix) a support ``M`` is chosen:

- ``"sparsity"``: the ``k = max(1, floor((1 - s) * n + 0.5))`` largest scores ``|w|``; ties go to the lower index.
- ``"l2"``: the exact L2 projection onto scaled ternary vectors: ``k* = argmax_k S_k^2 / k`` with ``S_k`` the sum
  of the ``k`` largest scores (smallest ``k`` on ties).
- ``"twn"``: ``|w| > 0.7 * mean|w|`` (Ternary Weight Networks).

With ``selection="tensor"`` and ``"sparsity"``, each channel's largest weight is always kept (a layer-wide top-k
could otherwise empty whole channels, e.g. classes of a classifier, at high sparsity).

With ``normalize`` the scores are ``|w| / ||w_c||_2`` (per output channel), which equalizes channels when the
support is selected over the whole tensor. For each *scale group* (a column, or the whole matrix) the scale is
``alpha = sum(|w| * M) / #{M and w != 0}``, the L2-optimal scale for that support, and the projection is
``W_q = alpha * sign(W) * M``.
"""

from __future__ import annotations

import numpy as np

THRESHOLDS = ("sparsity", "l2", "twn")
GRANULARITIES = ("channel", "tensor")
TWN_FACTOR = 0.7
_EPS = 1e-12


def as_groups(w: np.ndarray, channel_dims: int) -> np.ndarray:
    """Reshape a kernel to ``(n, C)``, ``C`` the product of its last ``channel_dims`` axes."""
    shape = np.shape(w)
    channels = int(np.prod(shape[len(shape) - channel_dims :]))
    return np.reshape(w, (-1, channels))


def max_sparsity(shape, channel_dims: int, min_kept: float) -> float:
    """The highest sparsity at which a kernel of ``shape`` keeps ``min_kept`` weights per output channel on
    average: ``1 - min_kept / fan_in`` (0 when the fan-in is ``min_kept`` or less; 1, no cap, for ``min_kept=0``).
    The fan-in is the number of weights per output channel (9 for a 3x3 depthwise filter)."""
    if min_kept <= 0:
        return 1.0
    channels = int(np.prod(shape[len(shape) - channel_dims :]))
    fan_in = int(np.prod(shape)) // max(channels, 1)
    return float(max(0.0, 1.0 - float(min_kept) / fan_in))


def keep_count(sparsity, n):
    """Number of weights kept in a group of ``n`` at ``sparsity``: ``max(1, floor((1 - s) * n + 0.5))``.

    Computed in float32 so that the numpy and TensorFlow versions agree on every rounding.
    """
    keep = np.floor((np.float32(1.0) - np.float32(sparsity)) * np.float32(n) + np.float32(0.5))
    return int(max(1, min(n, keep)))


def _scores_np(w2d: np.ndarray, normalize: bool) -> np.ndarray:
    scores = np.abs(w2d).astype(np.float32)
    if normalize:
        norms = np.sqrt(np.sum(np.square(w2d.astype(np.float32)), axis=0, keepdims=True))
        scores = scores / (norms + np.float32(_EPS))
    return scores


def _topk_mask_np(scores: np.ndarray, k_of_column) -> np.ndarray:
    """Per column, the mask of the k largest scores, ties to the lower index."""
    order = np.argsort(-scores, axis=0, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(scores.shape[0])[:, None], axis=0)
    return ranks < np.asarray(k_of_column)[None, :]


def _l2_keep_np(scores: np.ndarray) -> np.ndarray:
    """Per column, the k maximizing S_k^2 / k."""
    sorted_desc = -np.sort(-scores, axis=0)
    cums = np.cumsum(sorted_desc, axis=0, dtype=np.float64)
    ks = np.arange(1, scores.shape[0] + 1, dtype=np.float64)[:, None]
    return np.argmax(np.square(cums) / ks, axis=0) + 1


def _keep_alive_np(scores: np.ndarray, live: np.ndarray | None = None) -> np.ndarray:
    """Scores where each channel's largest (first on ties) ranks above every other weight of the layer, so that a
    layer-wide top-k keeps every channel alive whenever it keeps at least one weight per channel (every ``live``
    channel, when given)."""
    colmax = scores.max(axis=0, keepdims=True)
    is_max = scores == colmax
    first = is_max & (np.cumsum(is_max, axis=0) == 1)
    if live is not None:
        first = first & live[None, :]
    boost = np.float32(2.0) * scores.max() + np.float32(1.0)
    return (scores + first.astype(np.float32) * boost).astype(np.float32)


def dead_count(channel_sparsity, channels: int) -> int:
    """Output channels zeroed at ``channel_sparsity``: ``floor(c * C + 0.5)``, leaving at least one alive."""
    dead = np.floor(np.float32(channel_sparsity) * np.float32(channels) + np.float32(0.5))
    return int(max(0, min(channels - 1, dead)))


def dead_channels_np(w2d: np.ndarray, count: int) -> np.ndarray:
    """Boolean ``(C,)``: the ``count`` output channels of smallest L2 norm (ties to the lower index)."""
    norms = np.sqrt(np.sum(np.square(np.asarray(w2d, np.float32)), axis=0, dtype=np.float32))
    ranks = np.empty(norms.shape[0], np.int64)
    ranks[np.argsort(norms, kind="stable")] = np.arange(norms.shape[0])
    return ranks < count


def support_np(
    w2d: np.ndarray,
    *,
    threshold: str = "sparsity",
    sparsity: float = 0.0,
    selection: str = "channel",
    normalize: bool = False,
    dead: np.ndarray | None = None,
) -> np.ndarray:
    """Boolean support mask of ``w2d`` (shape ``(n, C)``); numpy reference of :func:`support_ops`. ``dead``
    (boolean ``(C,)``, see :func:`dead_channels_np`): channels left empty; the sparsity applies to the others."""
    scores = _scores_np(np.asarray(w2d), normalize)
    n, channels = scores.shape
    live = None
    if dead is not None:
        live = ~np.asarray(dead, bool)
        scores = scores * live[None, :]
    live_count = channels if live is None else int(live.sum())
    if selection == "tensor":
        flat = scores.reshape(-1, 1)
        if threshold == "sparsity":
            flat = _keep_alive_np(scores, live).reshape(-1, 1)
            mask = _topk_mask_np(flat, [keep_count(sparsity, n * live_count)])
        elif threshold == "l2":
            mask = _topk_mask_np(flat, _l2_keep_np(flat))
        else:
            mask = flat > np.float32(TWN_FACTOR) * np.mean(flat, dtype=np.float32)
        mask = mask.reshape(n, channels)
    elif threshold == "sparsity":
        mask = _topk_mask_np(scores, [keep_count(sparsity, n)] * channels)
    elif threshold == "l2":
        mask = _topk_mask_np(scores, _l2_keep_np(scores))
    else:
        mask = scores > np.float32(TWN_FACTOR) * np.mean(scores, axis=0, keepdims=True, dtype=np.float32)
    return mask if live is None else mask & live[None, :]


def scale_np(w2d: np.ndarray, mask: np.ndarray, granularity: str = "channel") -> np.ndarray:
    """L2-optimal scale per channel (shape ``(C,)``): the mean of ``|w|`` over the support (0 if empty)."""
    absw = np.abs(np.asarray(w2d, dtype=np.float32)) * mask
    axis = None if granularity == "tensor" else 0
    total = np.sum(absw, axis=axis, dtype=np.float32)
    count = np.sum(absw > 0, axis=axis, dtype=np.float32)  # a zero latent in the support codes to 0
    alpha = (total / np.maximum(count, np.float32(1.0))).astype(np.float32)
    return np.broadcast_to(alpha, (np.shape(w2d)[1],)).astype(np.float32)


def project_np(w2d: np.ndarray, mask: np.ndarray, granularity: str = "channel") -> np.ndarray:
    """``alpha * sign(w) * M`` for a fixed support ``M``."""
    alpha = scale_np(w2d, mask, granularity)
    return (alpha[None, :] * np.sign(w2d) * mask).astype(np.float32)


def ternarize_np(
    w: np.ndarray,
    channel_dims: int = 1,
    *,
    threshold: str = "sparsity",
    sparsity: float = 0.0,
    selection: str = "channel",
    granularity: str = "channel",
    normalize: bool = False,
    channel_sparsity: float = 0.0,
) -> np.ndarray:
    """Project a kernel of any shape onto sparse ternary values (numpy reference); ``channel_sparsity`` also
    empties that fraction of output channels (:func:`dead_channels_np`)."""
    w2d = as_groups(np.asarray(w, dtype=np.float32), channel_dims)
    dead = dead_channels_np(w2d, dead_count(channel_sparsity, w2d.shape[1])) if channel_sparsity > 0 else None
    mask = support_np(
        w2d, threshold=threshold, sparsity=sparsity, selection=selection, normalize=normalize, dead=dead
    )
    return project_np(w2d, mask, granularity).reshape(np.shape(w))


# ------------------------------------------------------------------------------- the twin, in keras.ops
# Written once against ``keras.ops`` (Keras 3), so that it runs on tensors of the selected Keras 3 backend: TF
# tensors in tf_keras graphs and under Keras 3's TensorFlow backend, JAX arrays under its JAX backend.


def _ops():
    from keras import ops

    return ops


def as_groups_ops(w, channel_dims: int):
    channels = int(np.prod(w.shape[len(w.shape) - channel_dims :]))
    return _ops().reshape(w, (-1, channels))


def keep_count_ops(sparsity, n):
    ops = _ops()
    n = float(n) if isinstance(n, int) else ops.cast(n, "float32")
    keep = ops.floor((1.0 - ops.cast(sparsity, "float32")) * n + 0.5)
    return ops.cast(ops.clip(keep, 1.0, n), "int32")


def _scores_ops(w2d, normalize: bool):
    ops = _ops()
    scores = ops.abs(w2d)
    if normalize:
        norms = ops.sqrt(ops.sum(ops.square(w2d), axis=0, keepdims=True))
        scores = scores / (norms + _EPS)
    return scores


def _topk_mask_ops(scores_cn, k):
    """``scores_cn`` is ``(groups, n)``, non-negative; ``k`` a scalar or ``(groups,)``. Returns the mask of the
    ``k`` largest per row, ties to the lower index (the same set as a stable descending sort).

    A full sort is slow on CPU for large layers, so the k-th largest value is found by bisection on the float32 bit
    patterns (monotonic for non-negative floats; 31 counting passes, exact), then ties at that value are taken in
    index order.
    """
    ops = _ops()
    bits = ops.view(ops.cast(scores_cn, "float32"), "int32")
    groups = bits.shape[0]
    k = ops.broadcast_to(ops.reshape(ops.cast(k, "int32"), (-1,)), (groups,))
    lo = ops.zeros((groups,), "int32")  # count(bits >= lo) >= k
    hi = ops.full((groups,), np.iinfo(np.int32).max, "int32")  # count(bits >= hi) < k (no finite float has it)
    for _ in range(31):
        mid = lo + (hi - lo) // 2
        enough = ops.sum(ops.cast(bits >= mid[:, None], "int32"), axis=-1) >= k
        lo = ops.where(enough, mid, lo)
        hi = ops.where(enough, hi, mid)
    above = bits > lo[:, None]
    at = bits == lo[:, None]
    room = k - ops.sum(ops.cast(above, "int32"), axis=-1)
    return ops.logical_or(above, ops.logical_and(at, ops.cumsum(ops.cast(at, "int32"), axis=-1) <= room[:, None]))


def _l2_keep_ops(scores_cn):
    ops = _ops()
    n = scores_cn.shape[-1]
    sorted_desc, _ = ops.top_k(scores_cn, k=n, sorted=True)
    cums = ops.cumsum(ops.cast(sorted_desc, "float64"), axis=-1)
    ks = ops.arange(1, n + 1, dtype="float64")
    return ops.cast(ops.argmax(ops.square(cums) / ks, axis=-1), "int32") + 1


def _keep_alive_ops(scores, live=None):
    """Twin of :func:`_keep_alive_np`."""
    ops = _ops()
    is_max = scores == ops.max(scores, axis=0, keepdims=True)
    first = ops.logical_and(is_max, ops.cumsum(ops.cast(is_max, "int32"), axis=0) == 1)
    if live is not None:
        first = ops.logical_and(first, live[None, :])
    boost = 2.0 * ops.max(scores) + 1.0
    return scores + ops.cast(first, "float32") * boost


def dead_count_ops(channel_sparsity, channels: int):
    """Twin of :func:`dead_count`."""
    ops = _ops()
    dead = ops.floor(ops.cast(channel_sparsity, "float32") * float(channels) + 0.5)
    return ops.cast(ops.clip(dead, 0.0, float(channels - 1)), "int32")


def dead_channels_ops(w2d, count):
    """Twin of :func:`dead_channels_np`."""
    ops = _ops()
    norms = ops.sqrt(ops.sum(ops.square(ops.cast(w2d, "float32")), axis=0))
    ranks = ops.argsort(ops.argsort(norms))  # the inverse of a stable ascending order
    return ranks < ops.cast(count, "int32")


def support_ops(w2d, *, threshold: str = "sparsity", sparsity=0.0, selection: str = "channel",
                normalize: bool = False, dead=None):
    """Boolean support mask of ``w2d`` (shape ``(n, C)``); equals :func:`support_np`."""
    ops = _ops()
    scores = _scores_ops(ops.cast(w2d, "float32"), normalize)
    n, channels = scores.shape
    live = None
    if dead is not None:
        live = ops.logical_not(ops.cast(dead, "bool"))
        scores = scores * ops.cast(live, "float32")[None, :]
    if threshold == "twn":
        axis = None if selection == "tensor" else 0
        mask = scores > TWN_FACTOR * ops.mean(scores, axis=axis, keepdims=True)
    elif selection == "tensor":
        if threshold == "sparsity":
            flat = ops.reshape(_keep_alive_ops(scores, live), (1, -1))
            live_count = channels if live is None else ops.sum(ops.cast(live, "int32"))
            k = keep_count_ops(sparsity, n * live_count)
        else:
            flat = ops.reshape(scores, (1, -1))
            k = _l2_keep_ops(flat)
        mask = ops.reshape(_topk_mask_ops(flat, k), (n, channels))
    else:
        columns = ops.transpose(scores)
        k = keep_count_ops(sparsity, n) if threshold == "sparsity" else _l2_keep_ops(columns)
        mask = ops.transpose(_topk_mask_ops(columns, k))
    return mask if live is None else ops.logical_and(mask, live[None, :])


def scale_ops(w2d, mask, granularity: str = "channel"):
    ops = _ops()
    absw = ops.abs(w2d) * ops.cast(mask, w2d.dtype)
    axis = None if granularity == "tensor" else 0
    total = ops.sum(absw, axis=axis)
    count = ops.sum(ops.cast(absw > 0, w2d.dtype), axis=axis)
    alpha = total / ops.maximum(count, 1.0)
    return ops.broadcast_to(alpha, (w2d.shape[1],))


def project_ops(w2d, mask, granularity: str = "channel"):
    ops = _ops()
    alpha = scale_ops(w2d, mask, granularity)
    return alpha[None, :] * ops.sign(w2d) * ops.cast(mask, w2d.dtype)
