"""LoRA merge math, in one place.

A LoRA layer computes  y = W0 x + sum_i s_i B_i A_i x  (`server.merge_kinds` has every kind: DoRA's rescaling,
embeddings, Conv1D, lora_bias, and how DoRA composes with other adapters), with s_i already multiplied by the
adapter's configured weight w_i when the adapters were loaded. Merging writes that exact change into the base weight
(or, as an opt-in, a TIES/DARE combination of the adapters' task vectors, `server.mixing`), so the model answers the
same without the side path. `modules_to_save` tensors replace their module whole.

Numerics: the deltas are small against W0 (often < 0.1 % of |W0|), so the sum is formed in float32 and rounded to the
serving dtype once. Rounding each delta, or adding them one by one in bf16/fp16, loses most of their low bits.
PEFT's `add_weighted_adapter(..., "linear")` is not used: it mixes A and B separately, which adds cross terms B_i A_j.

Tied embeddings: when the input and output embeddings share one tensor and an adapter changes either side, the
merged side gets its own tensor and the config is untied, so one trained matrix never overwrites the other.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any, cast

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import ModulesToSaveWrapper
from torch import nn

from server.errors import ExitCode, MergeserveError, Refusal
from server.merge.check import write_problem
from server.merge.combine import MixSpec, combine
from server.merge.kinds import LayerDelta, adapter_delta, composed_delta, has_adapter, layer_kind_problem
from server.merge.offload import onloaded
from server.merge.scratch import Scratch

LINEAR = MixSpec()


class MergeError(MergeserveError):
    """A merge that cannot be done exactly; `where` names the adapter and the module when one is to blame.

    Raised after loading it is a failed check (ExitCode.CHECK_FAILED); `check_mergeable` refusing an adapter before
    anything is touched is a bad input, and the loader says so when it re-raises it.
    """

    default_exit_code = ExitCode.CHECK_FAILED


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def saved_modules(model: nn.Module, adapters: list[str]) -> Iterator[tuple[str, ModulesToSaveWrapper, str]]:
    """(module name, wrapper, adapter) for every `modules_to_save` module one of `adapters` replaces."""
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper):
            for adapter in adapters:
                if adapter in module.modules_to_save:
                    yield name, module, adapter


def check_mergeable(model: nn.Module, adapters: list[str]) -> None:
    """Refuse, before anything is touched, what cannot be merged exactly."""
    for name, layer in lora_layers(model):
        for adapter in adapters:
            if has_adapter(layer, adapter) and (problem := layer_kind_problem(layer, adapter)):
                raise MergeError(*problem, f"adapter '{adapter}', module '{name}'")
    owners: dict[str, str] = {}
    for name, _, adapter in saved_modules(model, adapters):
        if name in owners:
            where = f"adapters '{owners[name]}' and '{adapter}', module '{name}'"
            raise MergeError("both replace it whole (modules_to_save)", "serve one of them", where)
        owners[name] = adapter


def base_weight(layer: LoraLayer) -> torch.Tensor:
    return cast(torch.Tensor, layer.get_base_layer().weight)


def layer_delta(
    layer: LoraLayer,
    adapters: list[str],
    spec: MixSpec = LINEAR,
    generator: torch.Generator | None = None,
    w0: torch.Tensor | None = None,
    scratch: Scratch | None = None,
) -> LayerDelta:
    """The combined float32 change to one layer's weight (and bias) from every adapter that targets it.

    `w0`: the unmerged base weight, when the layer does not hold it (the export's skeleton is on the meta device).
    `scratch`: where the exact sum may live (valid until the next layer's); TIES/DARE make their own tensors.
    """
    w0 = base_weight(layer).data if w0 is None else w0
    if spec.method == "linear":
        return composed_delta(layer, adapters, w0, scratch)
    parts = [adapter_delta(layer, a, w0) for a in adapters if has_adapter(layer, a)]
    weight = combine([p.weight for p in parts], spec, generator)
    biases = [p.bias for p in parts if p.bias is not None]
    return LayerDelta(weight, combine(biases, spec, generator) if biases else None)


def merged_weight(w0: torch.Tensor, delta: torch.Tensor, scratch: Scratch | None = None) -> torch.Tensor:
    """W0 + delta, formed in float32 and rounded once to W0's dtype; in `scratch`'s buffers when given (valid until
    the next layer's). Type promotion widens W0 exactly inside the add, which spares a float32 copy of W0, and
    copy_ rounds as .to() does."""
    w0, delta = w0.detach(), delta.detach().to(w0.device)
    if scratch is None:
        return torch.add(w0, delta).to(w0.dtype)
    wide = torch.add(w0, delta, out=scratch.take("wide", w0.shape, torch.float32, w0.device))
    if w0.dtype == torch.float32:
        return wide
    return scratch.take("narrow", w0.shape, w0.dtype, w0.device).copy_(wide)


def merged_slots(
    base: nn.Module, delta: LayerDelta, scratch: Scratch | None = None, check: bool = True
) -> Iterator[tuple[str, torch.Tensor, Refusal | None]]:
    """(slot, merged tensor, problem) for the base layer's weight and, when the adapters change it, its bias: W0 +
    delta rounded once (`merged_weight`), checked element by element against W0 still in the slot (`write_problem`;
    problem None unless `check`). The weight's merged tensor lives in `scratch` when given (valid until the next
    layer's); the bias, small, gets its own, so a caller may hold both at once."""
    for slot, change in (("weight", delta.weight), ("bias", delta.bias)):
        if change is None:
            continue
        served = cast(torch.Tensor, base._parameters[slot]).data
        merged = merged_weight(served, change, scratch if slot == "weight" else None)
        yield slot, merged, write_problem(served, merged, change) if check else None


def merge_layer(
    layer: LoraLayer, adapters: list[str], delta: LayerDelta | None = None, scratch: Scratch | None = None
) -> Refusal | None:
    """Write the merged weight (and bias) into the base layer, on the device where that weight lives.

    Returns None if what is now stored is W0 + delta rounded once (`server.merge_check`), else the problem: a weight
    that changed somewhere but not as the delta says, or a non-zero delta that rounded away entirely. Each merged
    tensor is checked before it is written, against W0 still in place, so no copy of W0 is kept (one 14336 x 4096
    weight of the 7.4B model is 117 MB in bf16); copy_ within one dtype stores it unchanged.
    """
    scratch = scratch or Scratch()
    delta = delta if delta is not None else layer_delta(layer, adapters, scratch=scratch)
    base = cast(nn.Module, layer.get_base_layer())
    problem = None
    for slot, merged, found in merged_slots(base, delta, scratch):
        cast(torch.Tensor, base._parameters[slot]).data.copy_(merged)
        problem = problem or found
    return problem


def _unwrap(module: nn.Module | None) -> nn.Module | None:
    if isinstance(module, ModulesToSaveWrapper):
        return cast(nn.Module, module.original_module)
    if isinstance(module, BaseTunerLayer):
        return cast(nn.Module, module.get_base_layer())
    return module


def untie_adapted_embeddings(model: nn.Module, adapters: list[str]) -> bool:
    """Give the output embedding its own tensor if it shares one with the input embedding and either side is adapted.

    Returns whether it untied. Must run before any merge writes into the shared tensor.
    """
    base = cast(Any, _bare(model))
    if not _tied(base):
        return False
    wrapped_in, wrapped_out = base.get_input_embeddings(), base.get_output_embeddings()
    wrappers = [m for m in (wrapped_in, wrapped_out) if isinstance(m, (LoraLayer, ModulesToSaveWrapper))]
    if not any(_targets(m, adapters) for m in wrappers):
        return False
    out = cast(nn.Module, _unwrap(wrapped_out))
    out.weight = nn.Parameter(cast(torch.Tensor, out.weight).detach().clone(), requires_grad=False)
    base.config.tie_word_embeddings = False
    return True


def served_embeddings(model: nn.Module, adapters: list[str]) -> list[tuple[str, nn.Module | None]]:
    """The input and output embedding modules the forward actually reads (a modules_to_save copy if one is active)."""
    base = cast(Any, _bare(model))
    saved = {id(wrapper): wrapper.modules_to_save[a] for _, wrapper, a in saved_modules(base, adapters)}
    pairs = (("input embedding", base.get_input_embeddings()), ("output embedding", base.get_output_embeddings()))
    return [(label, saved.get(id(module), _unwrap(module))) for label, module in pairs]


def _tied(model: nn.Module) -> bool:
    m = cast(Any, model)
    inp, out = _unwrap(m.get_input_embeddings()), _unwrap(m.get_output_embeddings())
    return inp is not None and out is not None and inp.weight is out.weight


def _targets(module: object, adapters: list[str]) -> bool:
    if isinstance(module, ModulesToSaveWrapper):
        return any(a in module.modules_to_save for a in adapters)
    return any(has_adapter(cast(LoraLayer, module), a) for a in adapters)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _unload(model: nn.Module, adapters: list[str]) -> nn.Module:
    """Replace every LoRA wrapper by its (merged) base layer, and every modules_to_save wrapper by the saved copy."""
    for name, layer in list(lora_layers(model)):
        _replace(model, name, cast(nn.Module, layer.get_base_layer()))
    saved = {name: wrapper.modules_to_save[adapter] for name, wrapper, adapter in saved_modules(model, adapters)}
    for name, module in list(model.named_modules()):
        if isinstance(module, ModulesToSaveWrapper):
            _replace(model, name, saved.get(name, module.original_module))
    if hasattr(model, "peft_config"):
        del model.peft_config
    return model


def _bare(peft_model: nn.Module) -> nn.Module:
    return cast(nn.Module, peft_model.get_base_model()) if isinstance(peft_model, PeftModel) else peft_model


def plan(peft_model: nn.Module, adapters: list[str], spec: MixSpec) -> dict[str, LayerDelta]:
    """Every layer's combined delta, computed up front (TIES/DARE: the parity reference needs the same deltas)."""
    generator = spec.generator()
    return {name: layer_delta(layer, adapters, spec, generator) for name, layer in lora_layers(peft_model)}


def merge_and_unload(
    peft_model: nn.Module, adapters: list[str], deltas: dict[str, LayerDelta] | None = None
) -> nn.Module:
    """Merge the weighted adapters into the base weights and return the bare base model.

    `deltas` (from `plan`) overrides the exact sum per layer. Raises MergeError if a targeted weight is not W0 + delta
    up to one rounding, if a delta rounded away entirely, or if a LoRA module or meta tensor remains.
    """
    check_mergeable(peft_model, adapters)
    untie_adapted_embeddings(peft_model, adapters)
    problems = []
    scratch = Scratch()
    for name, layer in lora_layers(peft_model):
        # Offloaded (device_map) weights come in for the merge and go back out after it (to disk if from disk).
        with onloaded(layer):
            if problem := merge_layer(layer, adapters, deltas[name] if deltas is not None else None, scratch):
                problems.append((name, problem))
    scratch.clear()
    refuse_writes(problems)
    model = _unload(_bare(peft_model), adapters)
    check_clean(model)
    return model


def refuse_writes(problems: list[tuple[str, Refusal]]) -> None:
    if problems:
        name, (problem, fix) = problems[0]
        raise MergeError(f"{len(problems)} targeted weights are wrong after merging (first: '{name}'): {problem}", fix)


def check_clean(model: nn.Module) -> None:
    """No LoRA module and no meta tensor may remain after a merge."""
    leftovers = [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer) or ".lora_" in n]
    leftovers += [n for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)]
    if leftovers:
        raise MergeError(f"LoRA modules remain after merging (first: '{leftovers[0]}')", "report this as a bug")
    meta = [n for n, p in model.named_parameters() if p.device.type == "meta" and not _offloaded(model, n)]
    if meta:
        raise MergeError(f"meta tensors remain after merging (first: '{meta[0]}')", "give the model more device memory")


def _offloaded(model: nn.Module, param_name: str) -> bool:
    """A meta parameter is fine when accelerate's hook on its module holds the real tensor in an offload store."""
    module_name, _, leaf = param_name.rpartition(".")
    hook = getattr(model.get_submodule(module_name), "_hf_hook", None)
    weights_map = getattr(hook, "weights_map", None)
    return bool(getattr(hook, "offload", False)) and weights_map is not None and leaf in weights_map


def merged_twin(peft_model: nn.Module, adapters: list[str]) -> nn.Module:
    """A merged model that shares every tensor with `peft_model` except the adapted weights.

    For A/B serving in one process: embeddings, norms and untargeted layers exist once; each adapted layer gets its
    own merged weight (the only extra memory), and the twin has no LoRA modules. A tied embedding pair comes apart by
    itself here, since the adapted side gets a new tensor; the twin's config (its own copy) records that.
    """
    check_mergeable(peft_model, adapters)
    base = _bare(peft_model)
    # deepcopy makes new module objects; the memo hands back the very same tensors instead of copies.
    shared: dict[int, object] = {id(t): t for t in (*base.parameters(), *base.buffers())}
    twin = copy.deepcopy(base, memo=shared)
    tied = _tied(twin)
    problems = []
    for name, layer in lora_layers(twin):
        target = cast(nn.Module, layer.get_base_layer())
        # Its slots still hold the served, unmerged tensors: the check needs no copy of W0 here.
        for slot, merged, problem in merged_slots(target, layer_delta(layer, adapters)):
            setattr(target, slot, nn.Parameter(merged, requires_grad=False))
            if problem:
                problems.append((name, problem))
    refuse_writes(problems)
    twin = _unload(twin, adapters)
    if tied and not _tied(twin):
        cast(Any, twin).config.tie_word_embeddings = False
    check_clean(twin)
    return twin
