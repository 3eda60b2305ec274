"""Run a daemon: command line, config, logging, signals, sd_notify, exit codes.

Theory of operation: `run()` is every daemon's `main`. It parses the common command line,
loads the config, sets up logging, and calls the daemon's `serve(svc)`. `serve` is either a
plain function whose loop calls `svc.wait(timeout)` between units of work, or a coroutine
function whose loop awaits `svc.stopped()`. Either way the daemon's own loop drives
`svc.tick()`, which sends WATCHDOG=1 at half of $WATCHDOG_USEC and a periodic STATUS=, so a
loop that hangs stops feeding the watchdog and systemd restarts it.

Signal handlers only set flags (mosquitto's signals.c does the same): SIGTERM/SIGINT ask the
loop to stop, SIGHUP asks it to call the daemon's reload callback *from the loop*. The daemon
has 10 s to return after a stop request; past that the process exits EX_SOFTWARE rather
than hang a shutdown.

Exit codes follow sysexits.h: 0 after a graceful stop, EX_CONFIG (78) for a bad config,
EX_USAGE (64) for a bad command line, otherwise whatever `Exit` carries; an unexpected
exception is logged with its traceback and exits EX_SOFTWARE (70).
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import sdnotify

from . import config as configmod

if TYPE_CHECKING:
    import asyncio  # imported for real only by an async daemon: ~3 MB less in each of the others

EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_OSERR = 71
EX_CANTCREAT = 73
EX_IOERR = 74
EX_TEMPFAIL = 75
EX_CONFIG = configmod.EX_CONFIG

STOP_GRACE = 10.0
STATUS_INTERVAL = 5.0


class Exit(Exception):
    """Raise from a daemon to end it with `code` after logging `message` as one error line."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


# -- logging ---------------------------------------------------------------------------------

_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


def _fmt_value(v: Any) -> str:
    s = v if isinstance(v, str) else str(v)
    if s == "" or any(c in s for c in ' ="\n\t'):
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return s


class _Formatter(logging.Formatter):
    """One line per event: message then key=value fields; syslog priority prefix for journald."""

    def __init__(self, journal: bool):
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        line = record.getMessage()
        fields = getattr(record, "kv", None)
        if fields:
            line += " " + " ".join(f"{k}={_fmt_value(v)}" for k, v in fields.items())
        if record.exc_info:
            # Tracebacks stay one journal entry per line but keep the priority on each.
            line += "\n" + self.formatException(record.exc_info)
        if self.journal:
            prefix = f"<{_PRIORITY.get(record.levelno, 6)}>"
            return "\n".join(prefix + part for part in line.split("\n"))
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
        return f"{stamp}.{int(record.msecs):03d} {record.levelname:<7} {record.name}: {line}"


def _stderr_is_journal() -> bool:
    # systemd's advice: trust JOURNAL_STREAM only if it names the stderr we actually have.
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in stream.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


class Log:
    """A logger whose calls take key=value fields: `log.info("connected", client=cid)`.

    The level check comes before any formatting so that disabled debug lines on a hot path
    cost one attribute lookup and a call.
    """

    __slots__ = ("_logger",)

    def __init__(self, name: str):
        self._logger = logging.getLogger(name)

    def _log(self, level: int, msg: str, exc_info: Any, fields: dict[str, Any]) -> None:
        if self._logger.isEnabledFor(level):
            self._logger.log(level, msg, exc_info=exc_info, extra={"kv": fields}, stacklevel=3)

    def debug(self, msg: str, **fields: Any) -> None:
        self._log(logging.DEBUG, msg, None, fields)

    def info(self, msg: str, **fields: Any) -> None:
        self._log(logging.INFO, msg, None, fields)

    def warning(self, msg: str, **fields: Any) -> None:
        self._log(logging.WARNING, msg, None, fields)

    def error(self, msg: str, exc_info: Any = None, **fields: Any) -> None:
        self._log(logging.ERROR, msg, exc_info, fields)

    def is_debug(self) -> bool:
        return self._logger.isEnabledFor(logging.DEBUG)


def apply_log_level(level: str, verbose: bool = False) -> str:
    """Set the root level from `[log] level` (-v: debug); returns the level now in effect."""
    level = "debug" if verbose else level
    logging.getLogger().setLevel(level.upper())
    return level


def setup_logging(name: str, verbose: bool = False) -> Log:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(journal=_stderr_is_journal()))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    # paho and asyncio chatter only when asked for.
    for noisy in ("asyncio", "paho", "watchdog"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose else logging.WARNING)
    return Log(name)


# -- the service -----------------------------------------------------------------------------


def status_file(cfg: configmod.Config, program: str):
    """Where a daemon run by supervisord keeps its last STATUS= line (`iotctl status` shows it)."""
    return cfg.paths.state_dir / "run" / "status" / program


class Service:
    """What a running daemon sees of its runtime. Created by `run()`."""

    def __init__(self, name: str, cfg: configmod.Config, args: argparse.Namespace, log: Log):
        self.name, self.config, self.args, self.log = name, cfg, args, log
        self.status_fn: Callable[[], str] | None = None
        # SIGHUP: applies what it can of the new config, returns the "[section] key"s it applied.
        self.on_reload: Callable[[configmod.Config], object] | None = None
        self._notifier = sdnotify.SystemdNotifier()
        if self._notifier.socket is not None:
            # A datagram send blocks while the receiver's queue is full (10 datagrams by default):
            # a supervisor that stops reading must not freeze our loop for good. Past 1 s the
            # message is dropped (sdnotify swallows the timeout); the next STATUS= follows.
            self._notifier.socket.settimeout(1.0)
        self._stop = threading.Event()
        self._stop_requested = False
        self._reload = False
        self._async_stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watchdog_interval = _watchdog_interval()
        now = time.monotonic()
        self._next_watchdog = now
        self._next_status = now + STATUS_INTERVAL
        self._ready = False
        program = os.environ.get("SUPERVISOR_PROCESS_NAME")
        self._status_file = status_file(cfg, program) if program and self._notifier.socket is None else None

    # notify ---------------------------------------------------------------------------------

    def notify(self, line: str) -> None:
        self._notifier.notify(line)

    def ready(self, status: str | None = None) -> None:
        """Tell the supervisor we serve. Call once the listener is bound / the client runs."""
        self._ready = True
        self.notify("READY=1" + (f"\nSTATUS={status}" if status else ""))
        if status:
            self._write_status(status)
        self.log.info("ready", **({"status": status} if status else {}))

    def set_status(self, text: str) -> None:
        self.notify(f"STATUS={text}")
        self._write_status(text)

    def _write_status(self, text: str) -> None:
        if self._status_file is not None:
            # supervisord has no STATUS=: the same line goes where `iotctl status` reads it.
            try:
                tmp = self._status_file.with_suffix(".tmp")
                tmp.write_text(text + "\n")
                os.replace(tmp, self._status_file)
            except OSError as e:
                self._status_file = None  # once: a status line is not worth a log line a second
                self.log.warning("cannot write the status file; iotctl status shows less", error=str(e))

    def tick(self) -> None:
        """Called from the daemon's own loop; cheap when nothing is due."""
        now = time.monotonic()
        if self._watchdog_interval and now >= self._next_watchdog:
            self._next_watchdog = now + self._watchdog_interval
            self.notify("WATCHDOG=1")
        if now >= self._next_status:
            self._next_status = now + STATUS_INTERVAL
            if self.status_fn is not None and self._ready:
                self.set_status(self.status_fn())
        if self._reload:
            self._reload = False
            self._do_reload()

    def _do_reload(self) -> None:
        """SIGHUP: read the config file again. `[log] level` takes effect at once; the daemon's
        `on_reload(new_config)`, if it has one, applies what it can; every other changed key is
        named as waiting for a restart. A file that does not load keeps everything as it was.
        The IOT_ environment variables apply again over the new file: a process's environment
        does not change, so a key they set keeps its value, whatever the file now says."""
        self.notify("RELOADING=1\nMONOTONIC_USEC=%d" % (time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000))
        try:
            new = configmod.load(self.args.config)
            applied = (self.on_reload(new) or ()) if self.on_reload is not None else ()
        except Exception as e:  # a bad file or a failed reload keeps the old state running
            self.log.error("reload failed; keeping the previous settings", error=str(e))
        else:
            level = apply_log_level(new.log.level, self.args.verbose)
            waiting = [k for k in configmod.changed_keys(self.config, new) if k != "[log] level" and k not in applied]
            fields = {"restart_needed": ",".join(waiting)} if waiting else {}
            self.log.info("reloaded", config=new.source or "(defaults)", log_level=level, **fields)
        self.notify("READY=1")

    # stopping --------------------------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def request_stop(self, reason: str = "requested") -> None:
        if self._stop_requested:
            return
        self._stop_requested = True
        # Told and logged before the loop is woken: once it is, the process may exit at once,
        # and this may run in the signal thread, which dies with it.
        self.notify("STOPPING=1")
        self.log.info("stopping", reason=reason)
        # A daemon that cannot finish its stop in time must not hang the host's shutdown.
        t = threading.Timer(STOP_GRACE, self._overdue)
        t.daemon = True
        t.start()
        self._stop.set()
        if self._loop is not None and self._async_stop is not None:
            self._loop.call_soon_threadsafe(self._async_stop.set)

    def _overdue(self) -> None:
        self.log.error("graceful stop took longer than %gs; exiting" % STOP_GRACE)
        logging.shutdown()
        os._exit(EX_SOFTWARE)

    def wait(self, timeout: float) -> bool:
        """Sleep up to `timeout` s (less if stopped); tick; return False once a stop is asked."""
        self.tick()
        if self._watchdog_interval:
            timeout = min(timeout, self._watchdog_interval)
        self._stop.wait(timeout)
        self.tick()
        return not self._stop.is_set()

    async def stopped(self) -> None:
        """Await the stop request while feeding the watchdog from this event loop."""
        assert self._async_stop is not None, "stopped() needs a coroutine serve()"
        import asyncio  # noqa: PLC0415 - see the top

        period = min(1.0, self._watchdog_interval or 1.0)
        while not self._async_stop.is_set():
            self.tick()
            try:
                await asyncio.wait_for(self._async_stop.wait(), period)
            except TimeoutError:
                pass

    # signals ---------------------------------------------------------------------------------

    def _signal(self, signum: int) -> None:
        if signum == signal.SIGHUP:
            self._reload = True
            if self._loop is not None:
                self._loop.call_soon_threadsafe(self.tick)
        else:
            self.request_stop(signal.Signals(signum).name)

    def _install_sync_signals(self) -> None:
        # Python runs a signal handler in the main thread between two bytecodes, possibly while
        # that thread holds the lock inside `self._stop.wait()`: a handler that set the Event
        # would wait for that lock for ever (seen once in 800 stops under load). So the handler
        # does nothing; the C-level handler writes the signal number to a wakeup fd, and a
        # thread of ours reads it and acts, taking locks like any other thread.
        rsock, wsock = socket.socketpair()
        wsock.setblocking(False)
        signal.set_wakeup_fd(wsock.fileno(), warn_on_full_buffer=False)
        self._wakeup = (rsock, wsock)  # kept open for the life of the process
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(s, lambda _signum, _frame: None)

        def watch() -> None:
            while True:
                try:
                    data = rsock.recv(64)
                except OSError:
                    return
                if not data:
                    return
                for signum in data:
                    if signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                        self._signal(signum)

        threading.Thread(target=watch, name="signals", daemon=True).start()

    async def _run_async(self, coro: Any) -> Any:
        import asyncio  # noqa: PLC0415 - see the top

        self._loop = asyncio.get_running_loop()
        self._async_stop = asyncio.Event()
        if self._stop.is_set():
            self._async_stop.set()
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            self._loop.add_signal_handler(s, self._signal, s)
        return await coro


def _watchdog_interval() -> float:
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return 0.0
    try:
        return max(int(usec) / 2e6, 0.01)
    except ValueError:
        return 0.0


def list_instances(prog: str, argv: Sequence[str], names: Callable[[configmod.Config], Sequence[str]]) -> int:
    """`--list`: print the instance names the config asks for (iot-plc@NAME, iot-ingest@I), one
    per line, for install.sh and people; the daemon itself does not start."""
    p = argparse.ArgumentParser(prog=prog, add_help=False)
    p.add_argument("-c", "--config")
    known, _ = p.parse_known_args(argv)
    try:
        print("\n".join(names(configmod.load(known.config))))
    except configmod.ConfigError as e:
        print(f"{prog}: config error: {e}", file=sys.stderr)
        return EX_CONFIG
    return EX_OK


def run(
    name: str,
    description: str,
    serve: Callable[[Service], Any],
    *,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
    argv: Sequence[str] | None = None,
    epilog: str | None = None,
    event_loop: Callable[[configmod.Config], str] | None = None,
) -> int:
    """Parse the command line, load config, run `serve`, and return the process exit code.
    `event_loop(config)` names the loop an async `serve` runs on: "uvloop" or "asyncio"."""
    parser = argparse.ArgumentParser(
        prog=name, description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "-c", "--config", metavar="FILE",
        help="config file (default: $IOT_CONFIG, else etc/iot/iot.toml in a checkout, else /etc/iot/iot.toml)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug lines")
    if add_arguments:
        add_arguments(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits 2 on bad usage and 0 on --help
        return EX_USAGE if e.code not in (0, None) else EX_OK

    log = setup_logging(name, args.verbose)
    try:
        cfg = configmod.load(args.config)
        apply_log_level(cfg.log.level, args.verbose)
        svc = Service(name, cfg, args, log)
        svc._install_sync_signals()  # an async serve() replaces these with loop handlers
        if inspect.iscoroutinefunction(serve):
            import asyncio  # noqa: PLC0415 - see the top

            if event_loop is not None and event_loop(cfg) == "uvloop":
                import uvloop  # noqa: PLC0415 - optional, only for the daemons that ask for it

                asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
            asyncio.run(svc._run_async(serve(svc)))
        else:
            serve(svc)
    except configmod.ConfigError as e:
        log.error(f"config error: {e}")
        return EX_CONFIG
    except Exit as e:
        log.error(str(e))
        return e.code
    except KeyboardInterrupt:
        return EX_OK
    except Exception as e:
        log.error("crashed", exc_info=e)
        return EX_SOFTWARE
    if not svc.stopping:
        svc.notify("STOPPING=1")
    log.info("stopped")
    return EX_OK
