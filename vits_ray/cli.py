"""The `vits-ray` command line: parse arguments, call the library, print the result.

Heavy imports (torch, ray, Coqui) happen inside each command so `--help` stays fast.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from vits_ray.config import ConfigError, load_config

CONFIG_HELP = "Recipe TOML file, or the name of a bundled recipe (bn_bd_vits, tiny)."
SET_HELP = "Override one key, e.g. --set optim.lr_gen=1e-4 (repeatable)."


def config_options(default: str | None = "bn_bd_vits"):
    def decorate(fn):
        fn = click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help=SET_HELP)(fn)
        fn = click.option("--config", "config_path", default=default, show_default=True, help=CONFIG_HELP)(fn)
        return fn
    return decorate


def load_or_exit(config_path, overrides):
    try:
        return load_config(config_path, overrides)
    except ConfigError as err:
        raise click.UsageError(f"bad configuration: {err}") from err


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vits-ray")
def main() -> None:
    """Fine-tune Coqui TTS's VITS on Bangladeshi Bangla speech with Ray Train, Ray Tune and S3."""


# --- config -------------------------------------------------------------------------------

@main.group()
def config() -> None:
    """Inspect configurations."""


@config.command("show")
@config_options()
def config_show(config_path, overrides) -> None:
    """Print the resolved configuration as TOML."""
    click.echo(load_or_exit(config_path, overrides).to_toml())


# --- text and demo corpus -----------------------------------------------------------------

@main.command()
@click.argument("text")
@click.option("--vocab", "vocab_path", type=click.Path(exists=True, dir_okay=False),
              help="vocab.json saved with a corpus or a run; default: the full Bangla character set.")
def text(text, vocab_path) -> None:
    """Print the normalised form of TEXT and its token ids."""
    from vits_ray.text import UnsupportedCharactersError, Vocabulary, normalize_text

    normalized = normalize_text(text)
    vocab = Vocabulary.load(vocab_path) if vocab_path else Vocabulary.full_bangla()
    click.echo(f"normalized: {normalized}")
    try:
        click.echo(f"token_ids: {vocab.encode(normalized)}")
    except UnsupportedCharactersError as err:
        raise click.ClickException(str(err)) from err


@main.command("demo-corpus")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--n", "count", default=40, show_default=True, help="Number of utterances.")
@click.option("--seed", default=0, show_default=True, help="Chooses and orders the sentences.")
def demo_corpus(out_dir, count, seed) -> None:
    """Write a small Bangla speech corpus (LJSpeech layout) synthesised with espeak-ng."""
    from vits_ray.demo.corpus import write_demo_corpus

    path = write_demo_corpus(Path(out_dir), n=count, seed=seed)
    click.echo(f"wrote {count} utterances to {path}")


def run() -> None:
    try:
        main()
    except ConfigError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)
