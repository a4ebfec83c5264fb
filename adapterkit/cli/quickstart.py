"""``adapterkit quickstart``: the main job, run from any folder with the data in the package."""

from __future__ import annotations

import click

from adapterkit.cli.common import obj


def _print_data_dir(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    from adapterkit.quickstart import data_dir

    click.echo(str(data_dir()))
    ctx.exit()


@click.command("quickstart")
@click.option("--part", type=click.Choice(["1", "2", "all"]), default="all", show_default=True,
              help="1: the triage pocket book (SFT with the forgetting guard); 2: bedside "
                   "manner (DPO on top of part one's triage); all: both, in order.")
@click.option("--base", default="smollm2-135m", show_default=True,
              help="The base (the embedded one needs `adapterkit base fetch smollm2-135m` once).")
@click.option("--max-steps", type=click.IntRange(min=1),
              help="Cap each part's training steps, for a quick look (default: part one one "
                   "epoch, part two 64 steps of 2 pairs — the figures the README reports).")
@click.option("--home", type=click.Path(file_okay=False),
              help="adapterkit home for this run (default: the root --home, $ADAPTERKIT_HOME "
                   "or ~/.local/share/adapterkit).")
@click.option("--data-dir", is_flag=True, expose_value=False, is_eager=True,
              callback=_print_data_dir,
              help="Print the folder of the quickstart's data files (in the package) and exit.")
@click.pass_context
def quickstart_cmd(ctx: click.Context, part: str, base: str, max_steps: int | None,
                   home: str | None) -> None:
    """Train the quickstart's pocket books on the bundled data and show what they changed.

    \b
    Part one: a "triage" pocket book (complaint in, specialist and urgency out) with the
    forgetting guard: answers side by side, held-out accuracy before and after, forgetting.
    Part two: a "bedside manner" pocket book trained with DPO on top of triage: held-out
    preference accuracy, the right-advice rate and forgetting. Each is checked against plain PEFT (verify).
    About 4 minutes on 2 CPU cores with bfloat16 instructions; the same as examples/quickstart.py and
    examples/quickstart_bedside.py in a checkout.
    """
    from adapterkit.quickstart import PART_TWO_STEPS, part_one, part_two

    home = home or obj(ctx)["home"]
    if part in ("1", "all"):
        part_one(base=base, steps=max_steps, home=home)
    if part in ("2", "all"):
        part_two(base=base, steps=max_steps or PART_TWO_STEPS, home=home)
