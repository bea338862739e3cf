"""`python -m kvdistill` and the `kvdistill` console script. SIGTERM / SIGUSR1 are caught from
the first line, before the (seconds of) imports: a job preempted while starting still ends
with the one line and exit 143."""

from kvdistill.errors import catch_early_signals

catch_early_signals()

from kvdistill.cli import main  # noqa: E402


def run() -> None:
    raise SystemExit(main())


if __name__ == "__main__":
    run()
