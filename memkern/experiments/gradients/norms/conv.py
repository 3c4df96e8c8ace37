"""Per-example squared norms of a Conv1d/Conv2d weight gradient, by the cheaper of two exact forms.

With ``a`` the ``[T, d]`` input patches of one example (``d = Cin/groups * kernel``) and ``g``
the ``[T, p]`` output gradients, the weight gradient is ``g^T a`` and

    ||g^T a||^2 = sum_{t,s} (a_t . a_s)(g_t . g_s).

- **direct**: copy the patches, form ``g^T a`` and reduce it: ``T d p`` multiply-adds, plus a
  copy of ``d T`` numbers. Cheap when ``d`` is small (a first layer on 3 channels).
- **input Gram**: the patch Gram ``a_t . a_s`` is a sum over kernel offsets of dot products of
  input pixels, so it is read off one Gram of the (padded) input, ``K = x^T x``, at shifted
  diagonals. Laid out with the padded row width, every kernel offset is a contiguous shift of
  the flattened image, so no patch is ever copied; a strided convolution is split into its
  ``stride_h * stride_w`` phase images first. Cost: ``L_in^2 Cin/groups`` for ``K`` plus
  ``L^2 (Cout/groups + kernel)`` for the output Gram and the shifted sums, with ``L`` the
  output positions on the padded width. On ResNet-9's 3x3 layers at 16x16 and 8x8 this is a
  half to a tenth of the weight-gradient convolution's own work.

The cheaper form is picked per layer by counting multiply-adds (:func:`direct_is_cheaper`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

Conv = nn.modules.conv._ConvNd


def _conv_pads(module: Conv, kernel: tuple[int, ...]) -> list[int]:
    """F.pad amounts (last dimension first) equal to the module's own padding."""
    pads: list[int] = []
    for dim in reversed(range(len(kernel))):
        if module.padding == "valid":
            left = right = 0
        elif module.padding == "same":
            total = module.dilation[dim] * (kernel[dim] - 1)
            left, right = total // 2, total - total // 2
        else:
            left = right = module.padding[dim]
        pads += [left, right]
    return pads


def _padded_2d(module: Conv, x: torch.Tensor):
    """The input padded as the module pads it, as ``[B, C, H, W]``, with the module's kernel,
    stride and dilation as 2-d tuples (a Conv1d is a Conv2d of height 1)."""
    pads = _conv_pads(module, module.kernel_size)
    if any(pads):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, pads, mode=mode)
    kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
    if x.dim() == 3:
        x, kernel, stride, dilation = x.unsqueeze(2), (1, *kernel), (1, *stride), (1, *dilation)
    return x, kernel, stride, dilation


class _Layout:
    """Where each kernel offset reads: phase ``(r_h, r_w)`` of the strided input and a shift
    ``q`` inside it; every phase image is stored ``rows x width`` (the output width plus the
    largest shift), so an offset's patch column is a contiguous run of the flattened image."""

    def __init__(self, kernel, stride, dilation, out_hw):
        self.stride = stride
        per_dim = [[((k * d) % s, (k * d) // s) for k in range(n)]
                   for n, d, s in zip(kernel, dilation, stride)]
        self.offsets = [((rh, rw), qh, qw) for rh, qh in per_dim[0] for rw, qw in per_dim[1]]
        ho, wo = out_hw
        self.width = wo + max(q for _, q in per_dim[1])
        self.used = (ho + max(q for _, q in per_dim[0])) * self.width + max(q for _, q in per_dim[1])
        self.rows = -(-self.used // self.width)
        self.positions = ho * self.width  # L: output positions on the padded width
        self.phases = sorted({phase for phase, _, _ in self.offsets})


def _phase_images(x: torch.Tensor, layout: _Layout, groups: int) -> dict:
    """``{phase: [B, groups, Cin/groups, used]}`` flattened, zero-filled phase images."""
    b, c = x.shape[:2]
    out = {}
    for rh, rw in layout.phases:
        src = x[:, :, rh::layout.stride[0], rw::layout.stride[1]][:, :, :layout.rows, :layout.width]
        buf = x.new_zeros(b, c, layout.rows, layout.width)
        buf[:, :, :src.shape[2], :src.shape[3]] = src
        out[(rh, rw)] = buf.view(b, groups, c // groups, -1)[..., :layout.used]
    return out


def input_gram_sq_norms(module: Conv, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``[B]`` squared weight-gradient norms from the input Gram (no patch copy)."""
    x, kernel, stride, dilation = _padded_2d(module, x)
    g = g.reshape(len(g), g.shape[1], -1, g.shape[-1])  # Conv1d: height 1
    b, ho, wo = len(g), g.shape[2], g.shape[3]
    layout = _Layout(kernel, stride, dilation, (ho, wo))
    groups, n = module.groups, layout.positions
    gq = g.new_zeros(b, g.shape[1], ho, layout.width)
    gq[..., :wo] = g  # the padding columns carry zero gradient: their Gram terms vanish
    gq = gq.view(b, groups, -1, n)
    patch_gram = None
    for phase, image in _phase_images(x, layout, groups).items():
        gram = image.mT @ image
        for _, qh, qw in (o for o in layout.offsets if o[0] == phase):
            start = qh * layout.width + qw
            part = gram[..., start:start + n, start:start + n]
            patch_gram = part.clone() if patch_gram is None else patch_gram.add_(part)
    return (patch_gram.mul_(gq.mT @ gq)).sum((1, 2, 3))


def conv_patches(module: Conv, x: torch.Tensor) -> torch.Tensor:
    """Input patches of a Conv1d/Conv2d, ``[B, groups, Cin/groups * kernel, T]``: a strided view
    of the padded input copied once (faster than F.unfold)."""
    x, kernel, stride, dilation = _padded_2d(module, x)
    x = x.contiguous()
    b, c, h, w = x.shape
    ho = (h - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    wo = (w - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    sb, sc, sh, sw = x.stride()
    view = x.as_strided((b, c, kernel[0], kernel[1], ho, wo),
                        (sb, sc, dilation[0] * sh, dilation[1] * sw, stride[0] * sh, stride[1] * sw))
    return view.reshape(b, module.groups, -1, ho * wo)


def direct_sq_norms(module: Conv, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``[B]`` squared weight-gradient norms by forming each example's ``g^T a``."""
    a = conv_patches(module, x)
    g = g.reshape(len(g), module.groups, module.out_channels // module.groups, -1)
    return torch.linalg.vector_norm((g @ a.mT).flatten(1), dim=1).square()


def _sizes(module: Conv, x: torch.Tensor, g: torch.Tensor):
    """(kernel elements, Cin/groups, Cout/groups, output positions T, layout) for one example."""
    kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
    if len(kernel) == 1:
        kernel, stride, dilation = (1, *kernel), (1, *stride), (1, *dilation)
    out_hw = (1, g.shape[-1]) if g.dim() == 3 else tuple(g.shape[-2:])
    k = kernel[0] * kernel[1]
    layout = _Layout(kernel, stride, dilation, out_hw)
    return (k, module.in_channels // module.groups, module.out_channels // module.groups,
            out_hw[0] * out_hw[1], layout)


def direct_is_cheaper(module: Conv, x: torch.Tensor, g: torch.Tensor) -> bool:
    """Multiply-adds of the direct form (with its patch copy) against the input Gram's."""
    k, cin, cout, t, layout = _sizes(module, x, g)
    direct = t * k * cin * (cout + 1)
    gram = len(layout.phases) * layout.used ** 2 * cin + layout.positions ** 2 * (cout + k)
    return direct <= gram


def conv_weight_sq_norms(module: Conv, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``[B]`` squared norms of each example's weight gradient; ``x`` the layer's input, ``g``
    the gradient at its output (both as the layer sees them)."""
    if direct_is_cheaper(module, x, g):
        return direct_sq_norms(module, x, g)
    return input_gram_sq_norms(module, x, g)


def conv_temp_bytes_per_example(module: Conv, x: torch.Tensor, g: torch.Tensor) -> int:
    """Rough size of the chosen form's temporaries for one example."""
    k, cin, cout, t, layout = _sizes(module, x, g)
    if direct_is_cheaper(module, x, g):
        numbers = k * cin * (t + cout) * module.groups
    else:  # phase images, one input Gram, the patch and output Grams, the padded gradient
        numbers = module.groups * (cin * layout.used * len(layout.phases) + layout.used ** 2
                                   + 2 * layout.positions ** 2 + cout * layout.positions)
    return (numbers + g[0].numel()) * x.element_size()
