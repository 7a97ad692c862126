"""`deepvis submit --address http://HEAD:8265 [--working-dir .] -- build ...`: run a deepvis command as
a Ray job on a cluster through Ray's Job Submission API (the head node's dashboard port), stream its
logs, and exit with its exit code. `--status ID`, `--logs ID` and `--stop ID` manage a submitted job.

Why the Job Submission API and not `ray.init("ray://...")`: the driver then runs on the head node,
next to the GCS, so a laptop that sleeps or loses Wi-Fi does not kill a day-long build."""
from __future__ import annotations

import os
import shlex
import sys
import time

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
# never uploaded with --working-dir: environments, caches, build outputs
EXCLUDES = [".venv", "venv", ".git", "__pycache__", "*.pyc", "artifacts", "atlas", ".whl", "*.egg-info",
            ".pytest_cache", "node_modules"]


def add_parser(sub):
    p = sub.add_parser("submit", help="run a build on a Ray cluster as a job (Job Submission API)",
                       description="Submit a deepvis command (usually `build`) to a Ray cluster as a job, "
                                   "stream its logs and progress, and exit with its exit code. The "
                                   "command goes after `--`: deepvis submit --address "
                                   "http://HEAD:8265 -- build --model torchvision:googlenet --out "
                                   "s3://bucket/atlas ... Ctrl-C stops following, not the job.",
                       epilog="The cluster's nodes must have deepvis installed (deploy/Dockerfile) or get "
                              "this code with --working-dir. Paths in the command are read on the cluster: "
                              "use s3:// URIs or absolute paths every node can see.")
    p.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS"),
                   help="the head node's dashboard, http://HEAD:8265 (default: RAY_API_SERVER_ADDRESS or "
                        "RAY_ADDRESS)")
    p.add_argument("--working-dir", default=None,
                   help="upload this directory (e.g. `.`, a checkout of deepvis) as the job's working "
                        "directory and run the command from it (`python -m cluster.cli`); without it the "
                        "cluster's installed `deepvis` runs")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="an environment variable for the job (repeatable), e.g. AWS_ENDPOINT_URL=...; "
                        "credentials are better left to the nodes' instance roles")
    p.add_argument("--job-id", default=None, help="submission id to use (default: Ray picks one)")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return at once")
    act = p.add_mutually_exclusive_group()
    act.add_argument("--status", metavar="ID", help="print the status of job ID and exit (0 if it succeeded)")
    act.add_argument("--logs", metavar="ID", help="print the logs of job ID so far")
    act.add_argument("--stop", metavar="ID", help="stop job ID")
    p.add_argument("job_command", nargs="*", metavar="-- COMMAND",
                   help="the deepvis command and its arguments, after `--` (e.g. -- build --model ...)")
    return p


def client(address: str | None):
    from deepvis.tasks.errors import UserError

    if not address:
        raise UserError("no cluster address: pass --address http://HEAD:8265 (the head node's dashboard) "
                        "or set RAY_API_SERVER_ADDRESS")
    if "://" not in address:
        address = "http://" + address
    if address.startswith("ray://"):
        raise UserError(f"{address!r} is a Ray Client address; submit needs the dashboard's, http://HEAD:8265")
    _use_token_if_present()
    from ray.job_submission import JobSubmissionClient   # after: Ray reads the auth mode on import

    try:
        return JobSubmissionClient(address)
    except Exception as e:  # ConnectionError, or a non-Ray server answering
        if type(e).__name__ == "AuthenticationError":
            raise UserError(f"the Ray cluster at {address!r} requires an auth token: set RAY_AUTH_TOKEN (or "
                            f"RAY_AUTH_TOKEN_PATH) to the cluster's token (`ray get-auth-token` on the head)") from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot reach the Ray dashboard at {address!r} ({first[:160]}); start the head with "
                        f"`ray start --head --dashboard-host 0.0.0.0` or check the address and port (8265)") from None


def _use_token_if_present() -> None:
    """Ray >= 2.5x clusters started with `ray start` require a token by default; like Ray's own CLI,
    send the token this machine has (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token).
    Ray reads RAY_AUTH_MODE once per process, so it is set before the first client is made."""
    if os.environ.get("RAY_AUTH_MODE"):
        return                                            # the user decided
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    if os.environ.get("RAY_AUTH_TOKEN") or os.path.isfile(path):
        os.environ["RAY_AUTH_MODE"] = "token"


def _job_call(fn, job_id: str):
    from deepvis.tasks.errors import UserError

    try:
        return fn(job_id)
    except RuntimeError as e:
        if "404" in str(e) or "does not exist" in str(e):
            raise UserError(f"no job {job_id!r} on this cluster; `ray job list --address ...` lists them") from None
        raise UserError(f"job {job_id!r}: {str(e).strip().splitlines()[0][:200]}") from None


def entrypoint(command: list[str], working_dir: str | None) -> str:
    """Validate the deepvis command with the CLI's own parser and turn it into a shell command line."""
    from deepvis.cli import build_parser
    from deepvis.tasks.errors import UserError

    if not command:
        raise UserError("nothing to submit: put the deepvis command after `--`, e.g. "
                        "deepvis submit --address http://HEAD:8265 -- build --model efficientnet_lite0 --out s3://b/atlas")
    if command[0] == "deepvis":
        command = command[1:]
    if command and command[0] in ("submit", "serve", "live"):
        raise UserError(f"`deepvis {command[0]}` is interactive or local; submit a build (or optimize, query, ...)")
    try:
        args = build_parser().parse_args(command)
    except SystemExit:
        raise UserError(f"the submitted command is not valid: deepvis {shlex.join(command)} "
                        f"(its error is printed above)") from None
    for name in ("out", "dataset", "store"):
        v = getattr(args, name, None)
        if isinstance(v, str) and v and "://" not in v and not os.path.isabs(v):
            raise UserError(f"--{name} {v!r} is a relative path, which would be read on the cluster inside the "
                            f"job's temporary directory; use s3://bucket/prefix or an absolute path every node sees")
    prog = ["python", "-m", "deepvis.cli"] if working_dir else ["deepvis"]
    return shlex.join(prog + command)


def _runtime_env(args) -> dict:
    from deepvis.tasks.errors import UserError

    env = {"PYTHONUNBUFFERED": "1"}
    for kv in args.env:
        k, sep, v = kv.partition("=")
        if not sep or not k:
            raise UserError(f"--env {kv!r}: expected KEY=VALUE")
        env[k] = v
    rt: dict = {"env_vars": env}
    if args.working_dir:
        wd = os.path.abspath(args.working_dir)
        if not os.path.isdir(wd):
            raise UserError(f"--working-dir {args.working_dir!r} is not a directory")
        rt.update(working_dir=wd, excludes=EXCLUDES)
    return rt


def follow(c, job_id: str, out=None) -> str:
    """Print the job's logs as they come until it ends; return its final status (a string)."""
    out = out or sys.stdout   # looked up at call time (a default would pin the import-time stream)
    import asyncio

    async def tail():
        async for chunk in c.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(tail())
    except Exception:  # the log stream broke (an old dashboard, a proxy): fall back to polling
        seen = 0
        while True:
            logs = c.get_job_logs(job_id)
            out.write(logs[seen:])
            out.flush()
            seen = len(logs)
            if str(c.get_job_status(job_id)) in TERMINAL:
                break
            time.sleep(2)
    for _ in range(60):   # the stream can end a moment before the status turns terminal
        status = str(c.get_job_status(job_id))
        if status in TERMINAL:
            return status
        time.sleep(0.5)
    return status


def exit_code(info) -> int:
    code = getattr(info, "driver_exit_code", None)
    if code is not None:
        return int(code)
    return 0 if str(info.status) == "SUCCEEDED" else 1


def run(args) -> int:
    from deepvis.tasks.errors import UserError

    if args.status or args.logs or args.stop:
        if args.job_command:
            raise UserError("--status/--logs/--stop take a job id and no command")
        c = client(args.address)
        if args.stop:
            stopped = _job_call(c.stop_job, args.stop)
            print(f"job {args.stop}: {'stop requested' if stopped else 'already finished'}")
            return 0
        if args.logs:
            sys.stdout.write(_job_call(c.get_job_logs, args.logs))
            return 0
        info = _job_call(c.get_job_info, args.status)
        msg = f" ({info.message})" if info.message else ""
        print(f"job {args.status}: {info.status}{msg}")
        print(f"entrypoint: {info.entrypoint}")
        return exit_code(info) if str(info.status) in TERMINAL else 0
    ep = entrypoint(args.job_command, args.working_dir)
    rt = _runtime_env(args)
    import logging
    logging.getLogger("ray").setLevel(logging.WARNING)   # Ray's packaging chatter; errors still show
    c = client(args.address)
    if args.working_dir:
        print(f"uploading {rt['working_dir']} (without {', '.join(EXCLUDES[:4])}, ...)", file=sys.stderr, flush=True)
    deadline = time.time() + 60
    while True:
        try:
            job_id = c.submit_job(entrypoint=ep, runtime_env=rt, submission_id=args.job_id)
            break
        except RuntimeError as e:
            text = str(e).strip().splitlines()[0][:300]
            # a head node that just started: its agent comes up a few seconds after the dashboard
            if "No available agent" in text and time.time() < deadline:
                time.sleep(2)
                continue
            hint = ("; the head's dashboard agent is not running (is its port, 52365 by default, taken?)"
                    if "No available agent" in text else "")
            raise UserError(f"the cluster refused the job: {text}{hint}") from None
    print(f"submitted job {job_id}: {ep}", file=sys.stderr, flush=True)
    if args.no_wait:
        print(job_id)
        return 0
    try:
        status = follow(c, job_id)
    except KeyboardInterrupt:
        print(f"\nstopped following; job {job_id} keeps running: deepvis submit --address {args.address} "
              f"--status {job_id} (or --stop {job_id})", file=sys.stderr)
        return 130
    info = c.get_job_info(job_id)
    code = exit_code(info)
    print(f"job {job_id}: {status}" + (f" ({info.message})" if status != "SUCCEEDED" and info.message else "")
          + f", exit code {code}", file=sys.stderr)
    return code
