"""`wsss compose`: write params.yaml from conf/ exactly as `dvc exp run` does (DVC's Hydra composition).

`wsss compose` writes the committed default; `wsss compose method=cam data=voc12-mini` previews an
experiment's params without running it (the same overrides as `dvc exp run -S ...`).
"""
from __future__ import annotations

from pathlib import Path

import typer

from stages._common import reports_errors, single_command
from stages.artifacts import PARAMS_FILE
from wsss_core.errors import ParamsError
from wsss_core.io import atomic_path

CONFIG_DIR = Path("conf")


def compose(overrides: list[str], config_dir: Path = CONFIG_DIR) -> str:
    """Return the YAML text DVC's Hydra composition writes to params.yaml for these overrides."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(str(config_dir.resolve()), version_base=None):
            config = hydra_compose(config_name="config", overrides=overrides)
        OmegaConf.resolve(config)
    except (HydraException, OmegaConfBaseException) as err:
        raise ParamsError(f"{config_dir}: cannot compose {' '.join(overrides) or 'the default'} "
                          f"({str(err).splitlines()[0]})") from None
    return OmegaConf.to_yaml(config)


@reports_errors
def compose_params(
    overrides: list[str] = typer.Argument(None, help="Hydra overrides, e.g. method=cam data=voc12-mini cls.lr=0.05"),
    out: Path = typer.Option(PARAMS_FILE, "--out", help="file to write ('-' prints it)"),
) -> None:
    """Compose params.yaml from conf/ (as `dvc exp run -S ...` would) and write it."""
    text = compose(overrides or [])
    if str(out) == "-":
        typer.echo(text, nl=False)
    else:
        with atomic_path(out) as temporary:
            temporary.write_text(text)
        typer.echo(f"wrote {out}")


app = single_command(compose_params)

if __name__ == "__main__":
    app()
