"""Our linears under their Hugging Face names, and LoRA targets given as PEFT module names.

Design note
-----------
Every transformer layer holds the linears ``q, k, v, o`` and ``fc1, fc2`` (BERT, RoBERTa)
or ``gate, up, down`` (LLaMA). :data:`LAYER_LINEARS` gives, once per architecture, each
one's module path inside a Hugging Face layer (``encoder.layer.{i}.`` / ``layers.{i}.``
dropped); weight loading, the PEFT adapter export and the ``save_pretrained`` export all
read it.

LoRA targets (``lora.targets``) may be our names or the module names PEFT users write in
``target_modules``. A PEFT name selects the linears whose module path equals it or ends in
``.name`` (PEFT's own rule), so for BERT ``query`` is ``q``, ``dense`` is ``o``, ``fc1`` and
``fc2``, and ``output.dense`` is ``o`` and ``fc2``; ``all-linear`` is every layer linear.
"""

from __future__ import annotations

from fedspine_jax.errors import UserError

_ENCODER = {"q": "attention.self.query", "k": "attention.self.key",
            "v": "attention.self.value", "o": "attention.output.dense",
            "fc1": "intermediate.dense", "fc2": "output.dense"}
_DECODER = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
            "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
            "down": "mlp.down_proj"}
# arch -> our linear name -> module path inside one Hugging Face layer
LAYER_LINEARS = {"bert": _ENCODER, "roberta": _ENCODER, "llama": _DECODER}
# arch -> the prefix of layer i's modules inside the base model (``BertModel``, ...)
LAYER_PREFIX = {"bert": "encoder.layer.{i}.", "roberta": "encoder.layer.{i}.",
                "llama": "layers.{i}."}
# our names, valid for every architecture (the config's default lists both families)
OURS = ("q", "k", "v", "o", "fc1", "fc2", "gate", "up", "down")
ALL_LINEAR = "all-linear"


class LoRATargetError(UserError, ValueError):
    """A LoRA target name that matches no linear of the model; the message lists the valid."""


def peft_names(arch: str) -> tuple[str, ...]:
    """The last components of ``arch``'s layer module paths (``query``, ``dense``,
    ``q_proj``), the names PEFT users usually write."""
    return tuple(dict.fromkeys(p.rsplit(".", 1)[-1] for p in LAYER_LINEARS[arch].values()))


def resolve_targets(arch: str, targets) -> tuple[str, ...]:
    """Our linear names (in layer order) that ``targets`` select in an ``arch`` model.

    Args:
      arch: ``bert``, ``roberta`` or ``llama``.
      targets: names, each ours (``q``, ``fc1``; a name of the other family selects
        nothing), a PEFT module name (``query``, ``dense``, ``q_proj``) or ``all-linear``.
    Raises:
      LoRATargetError: a name that is none of these.
    """
    linears = LAYER_LINEARS[arch]
    chosen = set()
    for t in targets:
        if t == ALL_LINEAR:
            chosen.update(linears)
        elif t in OURS:
            chosen.update({t} & set(linears))
        else:
            hit = {ours for ours, path in linears.items()
                   if path == t or path.endswith("." + t)}
            if not hit:
                raise LoRATargetError(
                    f"lora.targets: {t!r} is no linear of a {arch} model; valid: "
                    f"{', '.join((ALL_LINEAR,) + tuple(linears) + peft_names(arch))} or a "
                    f"dotted module path such as {next(iter(linears.values()))!r}")
            chosen.update(hit)
    return tuple(n for n in linears if n in chosen)
