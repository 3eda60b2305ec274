"""A minimal daemon built on daemons.service, to test the runtime itself before (and apart
from) the real daemons. `--async` runs the coroutine flavour of serve()."""

import sys

from daemons import service


def add_arguments(p):
    p.add_argument("--async", dest="use_async", action="store_true")
    p.add_argument("--hang-on-stop", action="store_true", help="ignore the stop request (tests the 10 s limit)")


def serve_sync(svc: service.Service) -> None:
    ticks = 0
    svc.status_fn = lambda: f"ticks={ticks}"
    svc.on_reload = lambda cfg: svc.log.info("reload callback ran", level=cfg.log.level)
    svc.ready("serving")
    while svc.wait(0.05):
        ticks += 1
    if svc.args.hang_on_stop:
        import time
        time.sleep(60)


async def serve_async(svc: service.Service) -> None:
    svc.status_fn = lambda: "async loop"
    svc.on_reload = lambda cfg: svc.log.info("reload callback ran", level=cfg.log.level)
    svc.ready("serving")
    await svc.stopped()


def main() -> int:
    use_async = "--async" in sys.argv
    return service.run("sample-daemon", "test daemon", serve_async if use_async else serve_sync,
                       add_arguments=add_arguments)


if __name__ == "__main__":
    sys.exit(main())
