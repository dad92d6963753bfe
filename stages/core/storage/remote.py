"""The DVC remotes' preflight: one cheap request to each S3 remote, as DVC would make it, whose
failure is one line naming the remote, bucket, endpoint and the fix.

DVC says "unexpected error" for a missing credential or bucket, and retries an unreachable endpoint
for up to half a minute (one that accepts the connection but never answers, for many minutes). This
check reads the remote as DVC resolves it (.dvc/config merged with .dvc/config.local, through
dvc-s3's own argument mapping: url, endpointurl, region, profile, keys), lists at most one key of
the remote's prefix with short timeouts and two attempts, and gives up after DEADLINE_S whatever
hangs (a DNS lookup included). No secret is ever part of a message."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from stages.core.config.errors import PipelineError

CONNECT_TIMEOUT_S = 3  # the check's own, where the remote sets no connect_timeout
READ_TIMEOUT_S = 5  # listing one key answers in well under a second on a live store
ATTEMPTS = 2  # in all (botocore's standard mode: one retry, after at most 2 s)
DEADLINE_S = 20  # the whole check of one remote, whatever hangs
# botocore's name of where it found credentials -> words for people
CREDENTIAL_SOURCES = {
    "explicit": "the remote's access_key_id and secret_access_key (dvc config)",
    "env": "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment",
    "shared-credentials-file": "the AWS shared credentials file (~/.aws/credentials)",
    "config-file": "the AWS config file (~/.aws/config)",
    "iam-role": "the instance's IAM role",
    "container-role": "the container's IAM role",
    "assume-role": "an assumed role of the AWS config",
    "sso": "AWS SSO",
}
SET_KEYS = (
    "export AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or run `dvc remote modify --local {remote} "
    "access_key_id ...` and `dvc remote modify --local {remote} secret_access_key ...` (or `profile NAME`)"
)


class RemoteError(PipelineError):
    """A DVC remote that cannot be used: its message names the remote, bucket, endpoint and the fix."""


@dataclass(frozen=True)
class Remote:
    """One DVC remote as DVC resolves it: `fs_args` are dvc-s3's arguments to s3fs (secrets among
    them: never printed)."""

    name: str
    url: str
    endpoint: str | None  # the remote's endpointurl, None: AWS itself
    fs_args: dict = field(repr=False)

    @property
    def bucket(self) -> str:
        return urlsplit(self.url).netloc

    @property
    def prefix(self) -> str:
        return urlsplit(self.url).path.strip("/")

    @property
    def is_s3(self) -> bool:
        return urlsplit(self.url).scheme == "s3"


def _shown(url: str) -> str:
    """An endpoint URL without any user:password part."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.hostname or "")) if "@" in parts.netloc else url


def _open(root: Path) -> Any:
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        return Repo(str(root))
    except DvcException as err:
        raise RemoteError(f"{root} is no DVC repository ({err}): run this in the project's root") from err


def remotes(root: Path, names: Iterable[str] | None = None) -> list[Remote]:
    """The remotes `names` (default: every remote of the DVC config), as DVC resolves them: the
    config of root/.dvc (config, config.local, and the user's and system's)."""
    from dvc.config import Config
    from dvc.exceptions import DvcException
    from dvc.fs import get_cloud_fs

    if not (root / ".dvc").is_dir():
        raise RemoteError(f"{root} is no DVC repository (no .dvc/): run this in the project's root")
    try:
        config = Config(dvc_dir=str(root / ".dvc"))
    except DvcException as err:
        raise RemoteError(f"the DVC config cannot be read: {err}") from err
    configured = config["remote"]
    names = list(names or configured)
    unknown = [n for n in names if n not in configured]
    if unknown:
        raise RemoteError(
            f"no DVC remote {', '.join(unknown)}; the DVC config has: {', '.join(configured) or 'none'}"
        )
    found = []
    for name in names:
        settings = configured[name]
        fs_args: dict = {}
        if urlsplit(settings["url"]).scheme == "s3":
            try:  # as DVC's DataCloud makes the remote's filesystem
                cls, fs_config, _ = get_cloud_fs(config, **settings)
                fs_args = dict(cls(**fs_config).fs_args)
            except DvcException as err:  # a bad setting (sse with sse_customer_key, ...)
                raise RemoteError(f"remote {name}: {err}") from err
        found.append(Remote(name, settings["url"], settings.get("endpointurl"), fs_args))
    return found


def pushed_remotes(root: Path, targets: Iterable[str]) -> list[str]:
    """The remotes that `dvc push --with-deps <targets>` and `dvc push --run-cache` write to: the
    default remote and the `remote:` of every cached out of the targets and their upstream stages."""
    from dvc.exceptions import DvcException

    with _open(root) as repo:
        default = repo.config["core"].get("remote")
        names = {default} if default else set()
        try:
            for target in targets:
                for stage in repo.stage.collect(target, with_deps=True):
                    names.update(out.remote or default for out in stage.outs if out.use_cache)
        except DvcException as err:
            raise RemoteError(f"cannot read the stages of {', '.join(targets)}: {err}") from err
    return sorted(n for n in names if n)


def _client(remote: Remote) -> tuple[Any, str]:
    """A botocore S3 client made as s3fs makes DVC's (same keys, profile, region, endpoint, TLS
    settings), with the check's short timeouts and attempts; and where its credentials come from,
    in words. RemoteError when there are none (before any request)."""
    from botocore import UNSIGNED
    from botocore.config import Config
    from botocore.session import Session

    args = remote.fs_args
    client_kwargs = args.get("client_kwargs", {})
    config_kwargs = args.get("config_kwargs", {})
    session = Session(profile=args.get("profile"))
    if args.get("anon"):
        source = "none (allow_anonymous_login)"
    elif args.get("key"):
        source = CREDENTIAL_SOURCES["explicit"]
    else:
        found = session.get_credentials()  # the client below signs with these
        if found is None:
            raise RemoteError(
                f"remote {remote.name}: s3://{remote.bucket}/{remote.prefix} at {_endpoint(remote)}: "
                f"no AWS credentials found: {SET_KEYS.format(remote=remote.name)}"
            )
        source = CREDENTIAL_SOURCES.get(found.method, found.method)
        source = f"{source}, profile {args['profile']}" if args.get("profile") else source
    config = Config(
        connect_timeout=int(config_kwargs.get("connect_timeout") or CONNECT_TIMEOUT_S),
        read_timeout=READ_TIMEOUT_S,
        retries={"mode": "standard", "total_max_attempts": ATTEMPTS},
        signature_version=UNSIGNED if args.get("anon") else None,
        s3=config_kwargs.get("s3") or None,
    )
    client = session.create_client(
        "s3",
        region_name=client_kwargs.get("region_name"),
        endpoint_url=client_kwargs.get("endpoint_url"),
        verify=client_kwargs.get("verify"),
        use_ssl=args.get("use_ssl", True),
        aws_access_key_id=args.get("key"),
        aws_secret_access_key=args.get("secret"),
        aws_session_token=args.get("token"),
        config=config,
    )
    return client, source


def _endpoint(remote: Remote, client: Any | None = None) -> str:
    if remote.endpoint:
        return _shown(remote.endpoint)
    aws = client.meta.endpoint_url if client is not None else "https://s3.amazonaws.com"
    return f"{aws} (AWS: the remote sets no endpointurl)"


def _unreachable_fix(remote: Remote) -> str:
    if remote.endpoint:
        return (
            f"check that the store runs at that address, or set the right one with `dvc remote modify "
            f"--local {remote.name} endpointurl URL`; check the network (firewall, HTTPS_PROXY)"
        )
    return (
        f"for an S3-compatible store (MinIO, R2, ...) set its address with `dvc remote modify --local "
        f"{remote.name} endpointurl URL`; for AWS, check the network (firewall, HTTPS_PROXY)"
    )


def _explain(remote: Remote, err: Exception, endpoint: str, source: str) -> str:
    """One line for a failed request: what failed, where, and the fix."""
    from botocore import exceptions as bx

    where = f"remote {remote.name}: s3://{remote.bucket}/{remote.prefix} at {endpoint}"
    creds = f"credentials from {source}"
    if isinstance(err, bx.ClientError):
        error = err.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("NoSuchBucket", "404") or status == 404:
            return (
                f"{where}: no bucket {remote.bucket} there: create it (`aws s3 mb s3://{remote.bucket}`, "
                f"with --endpoint-url for a non-AWS store) or point the remote at yours with `dvc remote "
                f"modify {remote.name} url s3://BUCKET/PREFIX`"
            )
        if code == "InvalidAccessKeyId":
            return (
                f"{where}: the store knows no such access key id ({creds}): use this store's keys "
                f"({SET_KEYS.format(remote=remote.name)})"
            )
        if code == "SignatureDoesNotMatch":
            return (
                f"{where}: the secret access key does not match its access key id ({creds}): "
                f"fix the secret ({SET_KEYS.format(remote=remote.name)})"
            )
        if code in ("ExpiredToken", "InvalidToken", "TokenRefreshRequired", "RequestExpired"):
            return f"{where}: the session credentials have expired ({creds}): renew them"
        if code in (
            "PermanentRedirect",
            "AuthorizationHeaderMalformed",
            "IllegalLocationConstraintException",
        ):
            region = (
                err.response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("x-amz-bucket-region")
            )
            return (
                f"{where}: the bucket is in another region{f' ({region})' if region else ''}: run "
                f"`dvc remote modify --local {remote.name} region {region or 'REGION'}`"
            )
        if code in ("AccessDenied", "403", "AllAccessDisabled", "AccountProblem") or status == 403:
            return (
                f"{where}: access denied ({code}, {creds}): use credentials allowed to list, read and "
                f"write s3://{remote.bucket}/{remote.prefix} (s3:ListBucket, s3:GetObject, "
                "s3:PutObject), or a remote url whose bucket they may use"
            )
        return f"{where}: the store refused the listing: {code or status} {error.get('Message', '')}".rstrip()
    if isinstance(err, bx.ConnectTimeoutError):
        return f"{where}: unreachable, no connection within the connect timeout: {_unreachable_fix(remote)}"
    if isinstance(err, bx.SSLError):
        return (
            f"{where}: TLS failed ({err}): for a store with its own certificate authority run `dvc "
            f"remote modify --local {remote.name} ssl_verify /path/to/ca.pem`; a plain-HTTP store needs "
            "an http:// endpointurl"
        )
    if isinstance(err, bx.ProxyConnectionError):
        return f"{where}: no connection through the proxy ({err}): check HTTPS_PROXY/HTTP_PROXY and NO_PROXY"
    if isinstance(err, bx.EndpointConnectionError | bx.ConnectionClosedError):
        return f"{where}: unreachable ({err}): {_unreachable_fix(remote)}"
    if isinstance(err, bx.ReadTimeoutError | TimeoutError):
        return (
            f"{where}: connected, but no answer within {READ_TIMEOUT_S} s (not an S3 endpoint, or a "
            f"stalled one): {_unreachable_fix(remote)}"
        )
    if isinstance(err, bx.NoCredentialsError | bx.PartialCredentialsError):
        return f"{where}: incomplete AWS credentials ({err}): {SET_KEYS.format(remote=remote.name)}"
    if isinstance(err, bx.ProfileNotFound):
        return (
            f"{where}: {err}: fix the profile with `dvc remote modify --local {remote.name} profile NAME` "
            "(or AWS_PROFILE), or add it to ~/.aws/config"
        )
    if isinstance(err, ValueError) and "endpoint" in str(err).lower():
        return f"{where}: {err}: set a URL with `dvc remote modify --local {remote.name} endpointurl URL`"
    return f"{where}: {type(err).__name__}: {err}"


def _check(remote: Remote) -> str:
    from botocore.exceptions import BotoCoreError, ClientError

    endpoint, source = _endpoint(remote), "?"
    try:
        client, source = _client(remote)
        endpoint = _endpoint(remote, client)
        prefix = f"{remote.prefix}/" if remote.prefix else ""
        client.list_objects_v2(Bucket=remote.bucket, Prefix=prefix, MaxKeys=1)
    except (BotoCoreError, ClientError, OSError, ValueError) as err:
        raise RemoteError(_explain(remote, err, endpoint, source)) from err
    return f"remote {remote.name}: s3://{remote.bucket}/{remote.prefix} at {endpoint} reachable"


def check(remote: Remote) -> str:
    """The line "remote <name>: s3://bucket/prefix at <endpoint> reachable" when listing one key of
    the remote's prefix works; else RemoteError whose message names the cause and the fix. Gives up
    after DEADLINE_S, whatever hangs."""
    if not remote.is_s3:
        return f"remote {remote.name}: {remote.url} is not S3: not checked"
    outcome: list = []

    def run() -> None:
        try:
            outcome.append(_check(remote))
        except RemoteError as err:
            outcome.append(err)

    worker = threading.Thread(target=run, name=f"check-{remote.name}", daemon=True)
    worker.start()
    worker.join(DEADLINE_S)  # a daemon thread: one still hanging does not keep the process alive
    if not outcome:
        raise RemoteError(
            f"remote {remote.name}: s3://{remote.bucket}/{remote.prefix} at {_endpoint(remote)}: no "
            f"answer within {DEADLINE_S} s (name lookup, connection or reply): {_unreachable_fix(remote)}"
        )
    if isinstance(outcome[0], RemoteError):
        raise outcome[0]
    return outcome[0]


def check_all(found: list[Remote]) -> list[str | RemoteError]:
    """`check` of each remote, side by side (so two dead endpoints cost one DEADLINE_S): per remote,
    its line or its RemoteError, in the order given."""
    results: list = [None] * len(found)

    def one(i: int) -> None:
        try:
            results[i] = check(found[i])
        except RemoteError as err:
            results[i] = err

    workers = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(len(found))]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return results
