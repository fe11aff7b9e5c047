"""The hook-name grammar: one home for reading, building and checking transformer_lens hook names.

A per-block hook is ``blocks.{L}.{point}``: ``L`` the block (layer) index and ``point`` what
follows it, e.g. ``hook_resid_pre``, ``hook_resid_mid``, ``hook_resid_post``, ``hook_attn_out``,
``hook_mlp_out``, ``attn.hook_z``, ``ln2.hook_normalized`` (in a pre-norm model such as Llama,
the residual the MLP reads, normalised; models load without weight processing, so the MLP reads
it times the norm's gain ``blocks.L.ln2.w``: what a transcoder reads). Other hooks
(``hook_embed``, ``ln_final.hook_normalized``) sit outside the blocks. What this module offers:

* :func:`parse_block_hook` -> :class:`BlockHook` (layer, point; None outside the blocks) and
  :func:`block_hook_name` (the inverse) -- what the cache, the splice and the sweep use to find
  a hook's layer, and to name the residuals around it (``BlockHook.resid_pre`` / ``resid_post``);
* :func:`resolve_hook` (a loaded model) and :func:`check_hook_name` (a list of valid names, e.g.
  from the model's configuration alone: ``model_loading.config_hook_names``): exact names pass;
  friendly forms (``resid_post.6``, ``6.resid_post``, ``layer6/mlp_out``, ``L6 mlp_out``,
  ``ln2.hook_normalized.6``, aliases ``resid``/``mlp``/``attn``, negative layers, ``embed``)
  resolve to the exact name or are refused with it; typos get close valid names ("did you
  mean"), wrong layers the valid range, and hooks that never fire (:data:`FLAGGED_POINTS`, e.g.
  ``hook_mlp_in``) what to use instead. :func:`active_hook_names` is the list of names that
  fire.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Any

from .errors import UserError

RESID_PRE = "hook_resid_pre"
RESID_POST = "hook_resid_post"
_BLOCK_HOOK = re.compile(r"^blocks\.(\d+)\.(.+)$")


class HookNameError(UserError, KeyError):
    """A hook name does not exist in the model (the message lists close valid names)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class BlockHook:
    """A hook inside a transformer block: ``blocks.{layer}.{point}``."""

    layer: int
    point: str
    """What follows ``blocks.{layer}.``, e.g. ``hook_resid_post`` or ``ln2.hook_normalized``."""

    @property
    def name(self) -> str:
        return block_hook_name(self.layer, self.point)

    @property
    def resid_pre(self) -> str:
        """``blocks.{layer}.hook_resid_pre``: the residual entering the block."""
        return block_hook_name(self.layer, RESID_PRE)

    @property
    def resid_post(self) -> str:
        """``blocks.{layer}.hook_resid_post``: the residual leaving the block."""
        return block_hook_name(self.layer, RESID_POST)

    @property
    def is_resid_post(self) -> bool:
        return self.point == RESID_POST


def parse_block_hook(name: str) -> BlockHook | None:
    """``blocks.{L}.{point}`` as a :class:`BlockHook`; None for any other string (a hook outside
    the blocks, or not an exact hook name: see :func:`resolve_hook` for friendly forms)."""
    m = _BLOCK_HOOK.match(name) if isinstance(name, str) else None
    return None if m is None else BlockHook(int(m.group(1)), m.group(2))


def block_hook_name(layer: int, point: str) -> str:
    """``blocks.{layer}.{point}``, e.g. ``block_hook_name(6, "hook_resid_post")``."""
    return f"blocks.{int(layer)}.{point}"


_HOOK_ALIASES = {
    "resid": "resid_post", "residual": "resid_post", "residual_post": "resid_post",
    "residual_pre": "resid_pre", "residual_mid": "resid_mid",
    "mlp": "mlp_out", "attn": "attn_out", "attention": "attn_out", "attn_output": "attn_out",
    "mlp_output": "mlp_out",
}
_LAYER_WORD = r"(?:blocks?|layers?|l)?"
_SEP = r"[._/: -]*"

FLAGGED_POINTS = {
    "hook_mlp_in": "use_hook_mlp_in", "hook_attn_in": "use_attn_in",
    "hook_q_input": "use_split_qkv_input", "hook_k_input": "use_split_qkv_input",
    "hook_v_input": "use_split_qkv_input", "attn.hook_result": "use_attn_result",
}
"""Block hook points transformer_lens creates in every block but runs only when a config flag
is on; models load with these flags off, so such a hook never fires (caching it would find
nothing)."""
_INSTEAD = {
    "hook_mlp_in": ("ln2.hook_normalized", "the MLP's input normalised, before the norm's gain",
                    "hook_resid_mid", "before the norm"),
    "hook_attn_in": ("ln1.hook_normalized", "the attention's input normalised, before the gain",
                     "hook_resid_pre", "before the norm"),
    "attn.hook_result": ("attn.hook_z", "the heads' outputs before W_O",
                         "hook_attn_out", "their sum"),
}
for _point in ("hook_q_input", "hook_k_input", "hook_v_input"):
    _INSTEAD[_point] = _INSTEAD["hook_attn_in"]


def active_hook_names(names: Any, model_cfg: Any) -> list[str]:
    """``names`` without the hooks that never fire in a model with transformer_lens config
    ``model_cfg`` (:data:`FLAGGED_POINTS` whose flag is off)."""
    def fires(name: str) -> bool:
        block = parse_block_hook(name)
        flag = FLAGGED_POINTS.get(block.point) if block else None
        return flag is None or bool(getattr(model_cfg, flag, False))
    return [n for n in names if fires(n)]


def _never_fires_message(hook: str, name: str, names: Any) -> str | None:
    """Why ``name`` (what ``hook`` means) cannot be cached, when it is a flagged hook point."""
    block = parse_block_hook(name)
    if block is None or block.point not in FLAGGED_POINTS:
        return None
    msg = (f"{hook!r} never fires in this model: transformer_lens runs {block.point} only with "
           f"{FLAGGED_POINTS[block.point]}=True, and models load without it")
    alt = _INSTEAD.get(block.point)
    if alt:
        options = [f"{block_hook_name(block.layer, point)} ({what})"
                   for point, what in (alt[:2], alt[2:])
                   if block_hook_name(block.layer, point) in names]
        if options:
            msg += f"; use {' or '.join(options)}"
    return msg


def resolve_hook(model: Any, hook: str) -> str:
    """The transformer_lens hook name that ``hook`` means for ``model``.

    Accepts exact names (``blocks.6.hook_resid_post``) and friendly forms: ``resid_post.6``,
    ``6.resid_post``, ``layer6/resid_post``, ``L6 mlp_out``, ``hook_resid_post_6``, aliases
    (``resid`` = resid_post, ``mlp`` = mlp_out, ``attn`` = attn_out), negative layers counted
    from the end (``resid_post.-1``) and block-less names (``embed`` = ``hook_embed``).
    Raises :class:`HookNameError` with close valid names (``blocks.3.hook_mlpout`` ->
    ``blocks.3.hook_mlp_out``) or the valid layer range (``layers 0-29``) otherwise.
    """
    return _resolve_in(active_hook_names(model.hook_dict, model.cfg), int(model.cfg.n_layers), hook)


def check_hook_name(hook: str, names: Any, n_layers: int) -> None:
    """Raise :class:`HookNameError` unless ``hook`` is exactly one of ``names`` (a model's
    transformer_lens hook names that fire: :func:`active_hook_names`). The message suggests the
    exact name a friendly form means (``resid_post.6`` -> ``blocks.6.hook_resid_post``), close
    matches on the name (``blocks.3.hook_mlpout`` -> ``blocks.3.hook_mlp_out``), the valid
    layer range, or, for a hook that never fires (``blocks.6.hook_mlp_in``), what to cache
    instead (``blocks.6.ln2.hook_normalized``)."""
    if hook in names:
        return
    exact = _resolve_in(names, n_layers, hook)  # raises with close names / the layer range
    raise HookNameError(f"{hook!r} is not a transformer_lens hook name; did you mean {exact}?")


def _resolve_in(names: Any, n_layers: int, hook: str) -> str:
    if not isinstance(hook, str) or not hook.strip():
        raise HookNameError(f"hook: expected a hook name such as blocks.6.hook_resid_post, "
                            f"got {hook!r}")
    text = hook.strip()
    if text in names:
        return text
    low = text.lower()
    layer_kind = _parse_friendly_hook(low)
    if layer_kind is not None:
        layer, kind = layer_kind
        if not -n_layers <= layer < n_layers:
            raise HookNameError(_out_of_range_message(hook, layer, kind, names, n_layers))
        layer %= n_layers
        kind = kind.removeprefix("hook_")
        kind = _HOOK_ALIASES.get(kind, kind)
        for candidate in (f"blocks.{layer}.hook_{kind}", f"blocks.{layer}.{kind}"):
            if candidate in names:
                return candidate
            never = _never_fires_message(hook, candidate, names)
            if never:
                raise HookNameError(never)
    else:
        bare = low.removeprefix("hook_")
        bare = _HOOK_ALIASES.get(bare, bare)
        if f"hook_{bare}" in names:
            return f"hook_{bare}"
    raise HookNameError(_unknown_hook_message(hook, names, layer_kind, n_layers))


def _parse_friendly_hook(low: str) -> tuple[int, str] | None:
    """(layer, kind) from forms like '6.resid_post', 'resid_post.6', 'layer6/mlp_out'."""
    segment = r"[a-z](?:[a-z_]|\d(?=[a-z_.]))*"  # digits inside a name (ln2), not at its end
    kind = rf"({segment}(?:\.{segment})*?)"
    patterns = [
        rf"^{_LAYER_WORD}{_SEP}(-?\d+){_SEP}{kind}$",
        rf"^{kind}{_SEP}(?:@|at)?{_SEP}{_LAYER_WORD}{_SEP}(-?\d+)$",
    ]
    m = re.match(patterns[0], low)
    if m:
        return int(m.group(1)), m.group(2).strip("._")
    m = re.match(patterns[1], low)
    if m:
        k = m.group(1).strip("._")
        k = re.sub(r"[._](?:blocks?|layers?|l)$", "", k)
        return int(m.group(2)), k
    return None


def _block_suffixes(names: Any) -> list[str]:
    """What follows ``blocks.0.`` in the per-block hook names, sorted."""
    return sorted({n.split(".", 2)[2] for n in names if n.startswith("blocks.0.")})


def _valid_names_text(names: Any, n_layers: int) -> str:
    suffixes = _block_suffixes(names)
    return (f"valid names are blocks.<0-{n_layers - 1}>.<{'|'.join(suffixes[:12])}"
            f"{'|...' if len(suffixes) > 12 else ''}> and "
            f"{', '.join(sorted(n for n in names if not n.startswith('blocks.')))}")


def _out_of_range_message(hook: str, layer: int, kind: str, names: Any, n_layers: int) -> str:
    msg = (f"hook {hook!r}: layer {layer} is out of range: the model has layers 0-{n_layers - 1} "
           f"({n_layers} blocks; -1 .. -{n_layers} count from the end)")
    suffix = kind if kind in _block_suffixes(names) else f"hook_{_HOOK_ALIASES.get(kind, kind)}"
    if f"blocks.{n_layers - 1}.{suffix}" in names:
        msg += f", e.g. blocks.{n_layers - 1}.{suffix}"
    return msg


def _unknown_hook_message(hook: str, names: Any, layer_kind: tuple[int, str] | None,
                          n_layers: int) -> str:
    """``unknown hook X; did you mean A or B?; valid names are ...``: close matches on the
    name within the same block (``blocks.3.hook_mlpout`` -> ``blocks.3.hook_mlp_out``), else
    on the whole name."""
    names = list(names)
    guesses: list[str] = []
    if layer_kind is not None:
        layer, kind = layer_kind[0] % n_layers, layer_kind[1]
        suffixes = _block_suffixes(names)
        for candidate in (kind, f"hook_{kind.removeprefix('hook_')}"):
            guesses += [f"blocks.{layer}.{g}" for g in
                        difflib.get_close_matches(candidate, suffixes, n=3, cutoff=0.6)
                        if f"blocks.{layer}.{g}" not in guesses]
    if not guesses:
        guesses = difflib.get_close_matches(hook.strip(), names, n=3, cutoff=0.6)
    msg = f"unknown hook {hook!r}"
    if guesses:
        msg += f"; did you mean {' or '.join(guesses[:2])}?"
    return f"{msg} ({_valid_names_text(names, n_layers)})"


# -- several hooks at once: lists, layer ranges and globs --------------------------------------

_BRACES = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^\s*(-?\d+)\s*\.\.\s*(-?\d+)\s*(?:\.\.\s*(\d+)\s*)?$")
_GLOB_CHARS = set("*?[")


def expand_hook_pattern(spec: Any, names: Any, *, n_layers: int | None = None,
                        field: str = "hooks") -> list[str]:
    """The hook names ``spec`` stands for, each one of ``names`` (e.g. the hooks a cache
    stores), in the order written, without repeats.

    ``spec`` is a name or a list of them; each may be

    * an exact name (``blocks.6.hook_resid_post``) or a friendly one (``resid_post.6``; needs
      ``n_layers``);
    * a brace pattern: ``{A..B}`` (inclusive layer range), ``{A..B..S}`` (step ``S``) or
      ``{a,b,c}``, e.g. ``blocks.{0..29..4}.hook_resid_post``; every name it makes must be in
      ``names`` (the error lists the missing ones and what there is);
    * a glob (``*``, ``?``, ``[...]``), e.g. ``blocks.*.hook_resid_post``, matched against
      ``names`` (sorted by layer); it must match at least one.

    Raises :class:`HookNameError` (one line naming ``field``) for an empty spec, a malformed
    brace, a name that is not there ("did you mean ..."), a glob that matches nothing, or a
    hook listed twice."""
    import fnmatch

    names = list(names)
    entries = [spec] if isinstance(spec, str) else spec
    if not isinstance(entries, (list, tuple)) or not entries or not all(
            isinstance(e, str) and e.strip() for e in entries):
        raise HookNameError(f"{field}: expected a hook name, a pattern such as "
                            f"blocks.{{0..29..4}}.hook_resid_post or a non-empty list of them, "
                            f"got {spec!r}")
    out: list[str] = []
    for entry in entries:
        entry = entry.strip()
        if _BRACES.search(entry):
            made = _expand_braces(entry, field)
            missing = [n for n in made if n not in names]
            if missing:
                raise HookNameError(
                    f"{field}: {entry!r} names {len(missing)} hook(s) not there: "
                    f"{', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''} "
                    f"({_there_text(names)})")
            found = made
        elif _GLOB_CHARS & set(entry):
            found = sorted((n for n in names if fnmatch.fnmatchcase(n, entry)), key=_layer_key)
            if not found:
                raise HookNameError(f"{field}: the pattern {entry!r} matches no hook "
                                    f"({_there_text(names)})")
        else:
            found = [_one_name(entry, names, n_layers, field)]
        for name in found:
            if name in out:
                raise HookNameError(f"{field}: {name} is listed twice (by {entry!r})")
            out.append(name)
    return out


def _expand_braces(text: str, field: str) -> list[str]:
    m = _BRACES.search(text)
    if m is None:
        return [text]
    body = m.group(1)
    r = _RANGE.match(body)
    if r is not None:
        start, stop, step = int(r.group(1)), int(r.group(2)), int(r.group(3) or 1)
        if step < 1 or stop < start:
            raise HookNameError(f"{field}: {{{body}}} in {text!r} is an empty range (write "
                                "{low..high} or {low..high..step} with low <= high, step >= 1)")
        values = [str(v) for v in range(start, stop + 1, step)]
    elif "," in body:
        values = [v.strip() for v in body.split(",")]
        if not all(values):
            raise HookNameError(f"{field}: {{{body}}} in {text!r} has an empty choice")
    else:
        raise HookNameError(f"{field}: cannot read {{{body}}} in {text!r}; write a layer range "
                            "{0..29}, {0..29..4} (every 4th) or a list {6,12,20}")
    head, tail = text[:m.start()], text[m.end():]
    return [n for v in values for n in _expand_braces(head + v + tail, field)]


def _one_name(entry: str, names: list[str], n_layers: int | None, field: str) -> str:
    if entry in names:
        return entry
    if n_layers:
        try:
            exact = _resolve_in(names, n_layers, entry)
        except HookNameError:
            exact = None
        if exact is not None:
            return exact
    guesses = difflib.get_close_matches(entry, names, n=2, cutoff=0.6)
    hint = f"; did you mean {' or '.join(guesses)}?" if guesses else ""
    raise HookNameError(f"{field}: {entry!r} is not there{hint} ({_there_text(names)})")


def _there_text(names: list[str]) -> str:
    shown = sorted(names, key=_layer_key)
    return (f"there are: {', '.join(shown[:10])}{' ...' if len(shown) > 10 else ''}"
            if shown else "there are none")


def _layer_key(name: str) -> tuple:
    block = parse_block_hook(name)
    return (0, block.point, block.layer) if block else (1, name, 0)
