"""A Hugging Face ``transformers`` GPT-2, built from a config, with the native GPT's sites.

``hf:gpt2?n_layer=4&n_embd=256&n_head=4`` builds ``GPT2Model`` from a ``GPT2Config`` (random
init from the global generator, which ``train`` seeds; nothing is downloaded or read) plus an
untied ``lm_head``: parameter names are those of ``GPT2LMHeadModel`` with
``tie_word_embeddings=False``. ``n_positions`` is the run's ``seq_len`` and ``vocab_size`` the
byte vocabulary. Keywords (:data:`KEYWORDS`) are GPT2Config fields; dropout probabilities
default to 0 so runs are deterministic. Values are data: checked against fixed types, ranges and
names, never used to pick code.

Sites per block, added without changing HF's forward (each acts through a forward pre-hook on
the Conv1D that reads it, so state-dict keys stay HF's):

- ``transformer.h.i.mlp.hidden``: ``[N, T, n_inner]`` channels last, the activation's output
  before ``mlp.c_proj``;
- ``transformer.h.i.attn.heads``: ``[N, n_head, T, head_dim]`` channels first, each head's
  output before ``attn.c_proj``, as the native GPT's ``blocks.i.attn.heads``.

transformers is optional (``pip install 'memkern[hf]'``); without it the build is a ConfigError.
"""
from __future__ import annotations

import importlib.util

import torch
from torch import nn

from memkern.errors import ConfigError
from memkern.network.models.zoo import parse_keywords
from memkern.network.sites import POST_ACTIVATION, ChannelSite, name_sites

PREFIX = "hf:gpt2"
HF_INSTALL = "pip install 'memkern[hf]' (transformers, no torch pulled: see README)"
# keyword -> (kind, default); kinds: "size" positive int, "size?" positive int or None,
# "prob" float in [0, 1), "positive" float > 0, "bool", "act" one of ACTIVATIONS
KEYWORDS = {"n_layer": ("size", 4), "n_embd": ("size", 256), "n_head": ("size", 4),
            "n_inner": ("size?", None), "activation_function": ("act", "gelu_new"),
            "resid_pdrop": ("prob", 0.0), "embd_pdrop": ("prob", 0.0), "attn_pdrop": ("prob", 0.0),
            "layer_norm_epsilon": ("positive", 1e-5), "initializer_range": ("positive", 0.02),
            "scale_attn_weights": ("bool", True),
            "scale_attn_by_inverse_layer_idx": ("bool", False)}
ACTIVATIONS = ("gelu_new", "gelu", "gelu_pytorch_tanh", "relu", "silu", "tanh")
FROM_RUN = {"n_positions": "--seq-len", "n_ctx": "--seq-len", "vocab_size": "the byte vocabulary"}


def is_hf_spec(name: str) -> bool:
    return name.startswith("hf:")


def _valid(kind: str, value) -> bool:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind in ("size", "size?"):
        return (value is None and kind == "size?") or (
            isinstance(value, int) and not isinstance(value, bool) and value >= 1)
    if kind == "prob":
        return number and 0.0 <= value < 1.0
    if kind == "positive":
        return number and value > 0
    if kind == "bool":
        return isinstance(value, bool)
    return value in ACTIVATIONS


def hf_gpt2_settings(name: str) -> dict:
    """The GPT2Config fields ``name`` sets, defaults filled in; ConfigError for another ``hf:``
    model, an unknown keyword or a value of the wrong kind."""
    base, _, query = name.partition("?")
    if base != PREFIX:
        raise ConfigError(f"model spec {name!r}: the hf: source builds gpt2 only "
                          f"(hf:gpt2?n_layer=4&n_embd=256...)")
    given = parse_keywords(query, name)
    for key in given:
        if key in FROM_RUN:
            raise ConfigError(f"model spec {name!r}: {key} comes from {FROM_RUN[key]}, not the "
                              f"spec")
        if key not in KEYWORDS:
            raise ConfigError(f"model spec {name!r}: unknown keyword {key!r}; hf:gpt2 takes "
                              f"{', '.join(KEYWORDS)}")
    settings = {k: given.get(k, default) for k, (_, default) in KEYWORDS.items()}
    for key, (kind, _) in KEYWORDS.items():
        if not _valid(kind, settings[key]):
            want = {"size": "a positive integer", "size?": "a positive integer or None",
                    "prob": "a probability in [0, 1)", "positive": "a positive number",
                    "bool": "True or False", "act": f"one of {', '.join(ACTIVATIONS)}"}[kind]
            raise ConfigError(f"model spec {name!r}: {key} must be {want}, got "
                              f"{settings[key]!r}")
    if settings["n_embd"] % settings["n_head"]:
        raise ConfigError(f"model spec {name!r}: n_embd {settings['n_embd']} must be a multiple "
                          f"of n_head {settings['n_head']}")
    return settings


class _SiteOnInput:
    """Forward pre-hook: the Conv1D's input ``[N, T, C]`` through ``site``, viewed as
    ``[N, heads, T, C / heads]`` when ``heads`` is set. An object, not a closure, so that
    ``copy.deepcopy(model)`` hooks the copy's layer to the copy's site."""

    def __init__(self, site: ChannelSite, heads: int | None = None):
        self.site, self.heads = site, heads

    def __call__(self, module, args):
        if not len(self.site.ops):  # an empty site is the identity: skip the reshapes
            return None
        x = args[0]
        if self.heads is None:
            return (self.site(x), *args[1:])
        n, t, c = x.shape
        y = self.site(x.view(n, t, self.heads, c // self.heads).transpose(1, 2))
        return (y.transpose(1, 2).reshape(n, t, c), *args[1:])


def import_gpt2():
    """``(GPT2Config, GPT2Model)``; ConfigError when transformers is not installed."""
    if importlib.util.find_spec("transformers") is None:
        raise ConfigError(f"model hf:gpt2 needs transformers, which is not installed: "
                          f"{HF_INSTALL}")
    if importlib.util.find_spec("torchvision") is not None:
        from memkern.network.models.zoo import import_torchvision
        import_torchvision()  # transformers imports it; its C ops may not load beside this torch
    from transformers import GPT2Config, GPT2Model

    return GPT2Config, GPT2Model


class HFGPT2(nn.Module):
    """int64 tokens ``[N, T]`` (T <= ``context``) -> next-token logits float ``[N, T, vocab]``."""

    def __init__(self, *, vocab: int, context: int, **settings):
        super().__init__()
        config_class, model_class = import_gpt2()
        config = config_class(vocab_size=vocab, n_positions=context, bos_token_id=None,
                              eos_token_id=None, tie_word_embeddings=False, use_cache=False,
                              **settings)
        self.context = context
        self.transformer = model_class(config)
        self.lm_head = nn.Linear(config.n_embd, vocab, bias=False)
        nn.init.normal_(self.lm_head.weight, std=config.initializer_range)
        inner = config.n_inner or 4 * config.n_embd
        for block in self.transformer.h:
            block.attn.heads = ChannelSite(config.n_head, POST_ACTIVATION, channel_dim=1)
            block.attn.c_proj.register_forward_pre_hook(
                _SiteOnInput(block.attn.heads, config.n_head))
            block.mlp.hidden = ChannelSite(inner, POST_ACTIVATION, channel_dim=-1)
            block.mlp.c_proj.register_forward_pre_hook(_SiteOnInput(block.mlp.hidden))
        layers = range(config.n_layer)
        self.default_dropout_sites = tuple(f"transformer.h.{i}.mlp.hidden" for i in layers)
        self.block_paths = tuple(f"transformer.h.{i}" for i in layers)
        self.layer_group_paths = (("transformer.wte", "transformer.wpe"),
                                  *(f"transformer.h.{i}" for i in layers),
                                  ("transformer.ln_f", "lm_head"))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.transformer(input_ids=tokens, position_ids=self._positions(tokens),
                                  use_cache=False).last_hidden_state
        return self.lm_head(hidden)

    def _positions(self, tokens: torch.Tensor) -> torch.Tensor:
        """int64 ``[N, T]``: positions per row: the position embedding then sees a ``[N, T]``
        lookup, so its per-example gradient norms are exact in ghost mode (a shared ``[1, T]``
        lookup would not be)."""
        n, t = tokens.shape[:2]
        if t > self.context:
            raise ConfigError(f"{t} tokens exceed the model's context of {self.context}")
        return torch.arange(t, device=tokens.device).expand(n, t)

    # The block stack (memkern.network.models.block_stack): GPT2Model.forward's own steps.
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """The residual stream entering block 0, float ``[N, T, n_embd]``."""
        tf = self.transformer
        return tf.drop(tf.wte(tokens) + tf.wpe(self._positions(tokens)))

    def run_blocks(self, x: torch.Tensor, start: int = 0, stop: int | None = None
                   ) -> torch.Tensor:
        """Blocks ``start..stop - 1`` on the residual stream entering block ``start``, with the
        causal mask GPT2Model builds for the configured attention implementation."""
        from transformers.masking_utils import create_causal_mask

        if len(x) == 0:  # transformers' attention cannot reshape an empty batch; blocks keep shapes
            return x
        positions = self._positions(x)
        mask = create_causal_mask(self.transformer.config, x, None, None,
                                  position_ids=positions)
        for block in self.transformer.h[start:stop]:
            x = block(x, None, mask, position_ids=positions)
        return x

    def readout(self, x: torch.Tensor) -> torch.Tensor:
        """The residual stream after the last block -> logits ``[N, T, vocab]``."""
        return self.lm_head(self.transformer.ln_f(x))


def build_hf_gpt2(name: str, *, vocab: int, context: int) -> HFGPT2:
    """A freshly initialized HF GPT-2 of the settings ``name`` names; sites named by path."""
    model = HFGPT2(vocab=vocab, context=context, **hf_gpt2_settings(name))
    name_sites(model)
    return model
