"""What every command shares: the ``flagmatch`` group, options generated from ``Settings`` (each command
shows the groups it reads), domain errors as clear messages, progress bars and the OS user as actor.
The command modules (``flagmatch.cli``, ``cli_hashes``, ``cli_heads``) add their commands to ``main``."""
from __future__ import annotations

import functools
import sys
from typing import Any, Callable

import click

from flagmatch import logs
from flagmatch.settings import GROUPS, SETTINGS, Settings
from indexer.errors import FlagmatchError


class SettingOption(click.Option):
    """An option generated from a Settings field; ``group`` titles its section in the help."""

    def __init__(self, *args: Any, group: str = "Options", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.group = group


class SettingsCommand(click.Command):
    """A command whose help lists its own options first, then its settings by group."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        sections: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None:
                sections.setdefault(getattr(param, "group", "Options"), []).append(record)
        for title, records in sections.items():
            with formatter.section(title):
                formatter.write_dl(records)


def with_settings(*groups: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add one option per setting of ``groups`` (the store's and operations' are always there) and pass the resolved
    Settings as ``settings``; settings of other groups still come from FLAGMATCH_* or their defaults."""
    wanted = ("store", *groups, "ops")
    chosen = [s for g in GROUPS for s in SETTINGS if s.group == g and g in wanted]

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            overrides = {s.name: kwargs.pop(s.name) for s in chosen}
            try:
                settings = Settings.load(overrides)
                if settings.log_format != "text":
                    logs.configure(settings.log_format)
            except ValueError as exc:
                raise click.UsageError(str(exc)) from None
            try:
                return fn(*args, settings=settings, **kwargs)
            except FlagmatchError as exc:
                raise click.ClickException(f"{exc.message} [{exc.code}]") from None

        for s in reversed(chosen):
            kind = click.FLOAT if s.type is float else click.INT if s.type is int else click.STRING
            default = ",".join(s.default) if isinstance(s.default, tuple) else s.default
            wrapper = click.option(s.flag, s.name, cls=SettingOption, group=f"{GROUPS[s.group]} settings",
                                   type=kind, default=None, show_default=False,
                                   help=f"{s.help} [env {s.env}; default {default!r}]")(wrapper)
        return wrapper
    return deco


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
def main() -> None:
    """flagmatch: find, group and review images similar to content already judged unsafe."""


class Bar:
    """Progress on stderr (tqdm), with the error count beside it."""

    def __init__(self, total: int | None) -> None:
        from tqdm import tqdm
        self.bar = tqdm(total=total, unit="img", dynamic_ncols=True, file=sys.stderr,
                        smoothing=0.1, disable=None)

    def update(self, n: int, *, errors: int) -> None:
        self.bar.set_postfix(errors=errors, refresh=False)
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


class Stages:
    """Progress of a long job stage by stage (``stage, done, total`` calls): on a terminal a bar per stage with
    its rate and ETA (tqdm); otherwise one line per stage on stderr as it ends, for logs."""

    def __init__(self) -> None:
        self.stage: str | None = None
        self.bar: Any = None
        self.done = self.total = 0
        self.started = 0.0

    def __call__(self, stage: str, done: int, total: int) -> None:
        import time

        from tqdm import tqdm
        if stage != self.stage:
            self.close()
            self.stage, self.started = stage, time.perf_counter()
            self.bar = tqdm(total=total, desc=stage, file=sys.stderr, dynamic_ncols=True, disable=None, leave=True)
        self.done, self.total = done, total
        if self.bar is not None and not self.bar.disable:
            self.bar.total = total
            self.bar.update(done - self.bar.n)

    def close(self) -> None:
        import time
        if self.stage is None:
            return
        if self.bar.disable:
            click.echo(f"{self.stage}: {self.done:,} of {self.total:,} in {time.perf_counter() - self.started:.1f} s",
                       err=True)
        self.bar.close()
        self.stage = None


def os_user() -> str:
    import getpass
    return getpass.getuser()
