"""What every pipeline's ``optimize_pack`` shares: checking a pack, naming its members,
and turning a pack of one back into a lone run's result or error."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

from gradgym.pipelines._loop import MemberOutcome
from gradgym.pipelines.base import PipelineResult, Report
from gradgym.pipelines.config import validate_config
from gradgym.pipelines.registry import pack_key


def check_pack(
    pipeline: str, cfgs: Sequence[Any], seeds: Sequence[int], reports: Sequence[Report]
) -> None:
    """Raise ``ValueError`` before any work unless the configs form one pack.

    Every config must be valid for ``pipeline``, there must be one seed and one report per
    config, and the configs may differ only in the pipeline's packable fields.
    """
    if not cfgs:
        raise ValueError(f"a {pipeline} pack needs at least one config")
    if not len(cfgs) == len(seeds) == len(reports):
        raise ValueError(
            f"a {pipeline} pack needs one seed and one report per config; got {len(cfgs)} "
            f"configs, {len(seeds)} seeds and {len(reports)} reports"
        )
    for cfg in cfgs:
        validate_config(cfg, pipeline)
    first = pack_key(cfgs[0])
    for index, cfg in enumerate(cfgs[1:], start=1):
        key = pack_key(cfg)
        if key != first:
            differ = sorted(name for (name, a), (_, b) in zip(first, key) if a != b)
            raise ValueError(
                f"config {index} cannot share a pack with config 0: they differ in "
                f"{', '.join(differ)}, which are not packable for {pipeline} (see "
                f"its PipelineSpec.packable_fields)"
            )


def member_names(name: str, seeds: Sequence[int]) -> list[str]:
    """Message names of a pack's members: ``name`` alone, ``name`` and the seed in a pack."""
    if len(seeds) == 1:
        return [name]
    return [f"{name}, pack member {index} (seed {seed})" for index, seed in enumerate(seeds)]


def member_renderers(
    cfgs: Sequence[Any], render: Callable[[int, Any], list]
) -> list[Callable[[Any], list] | None]:
    """Per member, ``params -> frames`` (``render(index, params)``), or ``None`` where the
    member's config turns rendering off."""
    return [functools.partial(render, index) if cfg.render else None for index, cfg in enumerate(cfgs)]


def lone_outcome(outcomes: list[MemberOutcome]) -> PipelineResult:
    """The result of a pack of one, or its error raised (a lone run's behavior)."""
    (outcome,) = outcomes
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome
