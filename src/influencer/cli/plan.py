# ruff: noqa: B008  (typer declares options as argument defaults)
"""``influencer plan``: predicted peak memory and time of a fit + scan, before running either."""

from __future__ import annotations

import typer

from influencer.cli._app import app
from influencer.cli._options import _CURV, DtypeChoice, FisherChoice, StrategyChoice, _value
from influencer.cli._progress import _console, _live, _Timer
from influencer.cli._runtime import _command
from influencer.cli._shared import _load_model, _say
from influencer.runs.checks import check_layers_early, model_source, parse_budget, resolve_device, select_layers_checked


@app.command()
@_command
def plan(
    model: str = typer.Argument(..., help="A local Hugging Face causal-LM folder, or the built-in smollm2-135m."),
    layers: str = typer.Option("mlp", "--layers", "-l", help="Tracked layers, as for fit.", rich_help_panel=_CURV),
    strategy: StrategyChoice = typer.Option(StrategyChoice.ekfac, "--strategy", rich_help_panel=_CURV),
    fisher: FisherChoice = typer.Option(FisherChoice.true, "--fisher", rich_help_panel=_CURV),
    blocks: int = typer.Option(1, "--blocks", min=1, rich_help_panel=_CURV),
    sequences: int = typer.Option(10_000, "--sequences", "-n", min=1, help="Training sequences N."),
    max_length: int = typer.Option(512, "--max-length", min=2, help="Tokens per sequence."),
    batch_size: int = typer.Option(8, "--batch-size", "-b", min=1),
    queries: int = typer.Option(16, "--queries", min=1, help="Queries scanned together."),
    rank: int = typer.Option(32, "--rank", min=1, help="Rank of the stored queries."),
    memory_budget: str = typer.Option(
        "auto", "--memory-budget", help="Suggest settings within this (auto: the memory available; e.g. 20GB)."
    ),
    time_stages: bool = typer.Option(True, "--time/--no-time", help="Also predict times (a few timed passes)."),
    device: str = typer.Option("auto", "--device", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N."),
    dtype: DtypeChoice = typer.Option(DtypeChoice.float32, "--dtype", help="Model weights dtype."),
) -> None:
    """Predict the peak memory and time of each stage of a fit and a scan of MODEL with these settings, and
    suggest settings (blocks, batch size, rank) within the memory budget. fit and scan run the same check
    before they start and refuse a run that would not fit.

    Example: influencer plan smollm2-135m --layers mlp -n 100000 --queries 64
    """
    from influencer.guard import memory_limit
    from influencer.plan import plan as make_plan

    strategy_name, fisher_name = _value(strategy), _value(fisher)
    budget = parse_budget(memory_budget)
    source = model_source(model)
    check_layers_early(source, layers)
    resolved = resolve_device(device)
    console = _console()
    timer = _Timer()
    with _live(timer):
        import influencer as inf

        net, tok = _load_model(timer, source, _value(dtype), resolved)
        tracked = select_layers_checked(net, layers)
        task = inf.CausalLM(pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0)
        limit = memory_limit(budget, resolved)
        with timer.stage("plan"):
            p = make_plan(
                net,
                task,
                [x.name for x in tracked],
                strategy=strategy_name,
                fisher=fisher_name,
                blocks=blocks,
                rank=rank,
                n_queries=queries,
                batch_size=batch_size,
                seq_len=max_length,
                n_train=sequences,
                memory_budget=limit,
                calibrate=time_stages,
            )
    _say(console, f"{len(tracked)} tracked layers of {source}")
    _say(console, p.report())
