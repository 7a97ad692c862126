"""S3 (and S3-compatible: MinIO, SeaweedFS, Ceph RGW, Cloudflare R2) object store.

Address: ``s3://bucket/prefix``. Keys are relative to the prefix.

- Credentials and region come from the standard AWS chain (boto3's default session): environment
  variables, ``AWS_PROFILE`` / shared config files, SSO, container and instance roles. Nothing is
  ever passed in the address, and nothing secret is kept in ``uri``, ``repr`` or error messages.
- The endpoint of an S3-compatible server comes from the ``endpoint_url`` argument or, as botocore
  itself resolves it, ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` / ``endpoint_url`` in the
  profile. Such endpoints are addressed path-style (``http://host:port/bucket/key``), which every
  compatible server supports, and checksums are sent only where the API requires them.
- Retries: botocore's "standard" mode (override with ``AWS_RETRY_MODE``/``AWS_MAX_ATTEMPTS`` or the
  ``max_attempts`` argument). Throttling (503 SlowDown) backs off exponentially from 1 s; 5xx and
  connection errors back off from 50 ms, so a dead endpoint fails within about a second or two.
- At construction the bucket is checked (HEAD bucket, short timeouts, one retry), so a build with a
  bad address, bad keys, a missing bucket or an unreachable endpoint stops with one clear line
  (``StoreError``) within seconds, before any work starts.
- The store pickles without its client (Ray ships it to actors); each process makes its own client
  lazily from its own credential chain (credentials are never pickled).
"""
from __future__ import annotations

import io
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit, urlunsplit

from deepvis.storage.errors import StoreError
from deepvis.storage.base import Store, Writer, check_key, content_type

MiB = 1024 * 1024
POOL_CONNECTIONS = 64  # HTTP connections per client: enough for a Writer's uploads in flight
_LOADER = None  # botocore's data loader, shared by the sessions of this process

# one line each; the fix is part of the message
_AUTH_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "Forbidden",
               "InvalidToken", "ExpiredToken", "TokenRefreshRequired", "InvalidSecurity",
               "AllAccessDisabled", "AccountProblem",
               "InvalidClientTokenId", "UnrecognizedClientException", "RequestTimeTooSkewed"}
_MISSING_BUCKET_CODES = {"NoSuchBucket"}
_MISSING_KEY_CODES = {"NoSuchKey", "404", "NotFound"}
_BUCKET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,61}[A-Za-z0-9]$")
_CRED_HINT = ("check the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or the "
              "instance role) and the bucket policy")


def redact_url(url: str | None) -> str | None:
    """A URL without user:password@ or query (never print secrets)."""
    if not url:
        return url
    try:
        p = urlsplit(url)
        if "@" not in p.netloc and not p.query and not p.fragment:
            return url  # nothing secret: unchanged (case and all)
        host = p.hostname or ""
        if p.port:
            host = f"{host}:{p.port}"
        return urlunsplit((p.scheme, host, p.path, "", ""))
    except ValueError:
        return "<unparsable endpoint>"


_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^\s/@'\"`]*@")
_QUERY = re.compile(r"(?i)(\b[a-z][a-z0-9+.-]*://[^\s?'\"`]*)\?[^\s'\"`]*")


def redact_text(text: str, *urls: str | None) -> str:
    """text with each of urls (as given) redacted, and any other URL's user:secret@ and ?query
    removed (for messages that quote an address, e.g. botocore's)."""
    for url in urls:
        if url:
            text = text.replace(url, redact_url(url) or "")
    return _QUERY.sub(r"\1", _USERINFO.sub(r"\1", text))


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """'s3://bucket/a/b' -> ('bucket', 'a/b'). StoreError (one line, no secrets) when malformed."""
    if not isinstance(uri, str) or not uri.startswith("s3://"):
        raise StoreError("S3 store address must look like s3://bucket/prefix")
    rest = uri[len("s3://"):]
    bucket, _, prefix = rest.partition("/")
    if "@" in bucket:
        # never echo it: the part before @ may be a secret
        raise StoreError("S3 store address must not contain credentials (user:secret@); give them "
                         "through AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or an instance role")
    if not bucket:
        raise StoreError(f"no bucket name in store address {uri!r}; use s3://bucket/prefix")
    if "?" in uri or "#" in uri:
        raise StoreError(f"store address {uri!r} has a query or fragment; use s3://bucket/prefix")
    if ":" in bucket:
        raise StoreError(f"store address {uri!r} has a host:port where the bucket name goes; use "
                         "s3://bucket/prefix and give the server as endpoint_url or AWS_ENDPOINT_URL")
    if not _BUCKET_RE.match(bucket) or ".." in bucket:
        raise StoreError(f"invalid bucket name {bucket!r} in {uri!r}: 3-63 characters, lowercase letters, "
                         "digits, '.', '-', starting and ending with a letter or digit")
    prefix = prefix.rstrip("/")
    if prefix and any(p in ("", ".", "..") for p in prefix.split("/")):
        raise StoreError(f"invalid prefix {prefix!r} in {uri!r}: no empty, '.' or '..' path segments")
    return bucket, prefix


class S3Store(Store):
    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None,
                 region: str | None = None, max_attempts: int | None = None,
                 multipart_threshold: int = 16 * MiB, multipart_chunksize: int = 16 * MiB,
                 max_concurrency: int = 4, connect_timeout: float = 3.0, read_timeout: float = 20.0,
                 check: bool = True):
        self.bucket, self.prefix = parse_s3_uri(f"s3://{bucket}/{prefix}".rstrip("/"))
        self._base = self.prefix + "/" if self.prefix else ""
        self.uri = f"s3://{self.bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self._endpoint_arg = endpoint_url
        self.region = region
        self.max_attempts = max_attempts
        self.multipart_threshold = int(multipart_threshold)
        self.multipart_chunksize = int(multipart_chunksize)
        self.max_concurrency = int(max_concurrency)
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._init_runtime()
        probe = None
        if endpoint_url is None:
            # botocore resolves AWS_ENDPOINT_URL(_S3) / profile endpoint_url itself; look at what it
            # chose so that custom servers get path-style addressing, and so that a pickled copy in
            # another process (a Ray actor) talks to the same server.
            probe = self._make_client(probe=True, endpoint_url=None)
            if _is_custom_endpoint(probe.meta.endpoint_url):
                self._endpoint_arg = probe.meta.endpoint_url
                probe = None
        if check:
            self.check(probe)

    @classmethod
    def from_uri(cls, uri: str, endpoint_url: str | None = None, **kwargs) -> "S3Store":
        bucket, prefix = parse_s3_uri(uri)
        return cls(bucket, prefix, endpoint_url=endpoint_url, **kwargs)

    # -- clients ---------------------------------------------------------------------------------
    def _init_runtime(self):
        self._lock = threading.Lock()
        self._client = None
        self._client_pid = None
        self._transfer_config = None

    def __getstate__(self):
        state = self.__dict__.copy()
        for k in ("_lock", "_client", "_client_pid", "_transfer_config"):
            state.pop(k, None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._init_runtime()

    def __repr__(self):
        ep = f", endpoint={redact_url(self._endpoint_arg)!r}" if self._endpoint_arg else ""
        return f"S3Store({self.uri!r}{ep})"

    @property
    def endpoint_url(self) -> str | None:
        """The endpoint override in use (None: AWS's own S3 endpoints)."""
        return self._endpoint_arg

    def _where(self) -> str:
        return redact_url(self._endpoint_arg) or "AWS S3"

    def _make_client(self, probe: bool = False, endpoint_url: str | None | bool = False):
        import boto3
        import botocore.session
        from botocore.config import Config

        endpoint = self._endpoint_arg if endpoint_url is False else endpoint_url
        bsession = botocore.session.get_session()
        # a fresh session each time (credentials/env are read anew), but one shared data loader:
        # parsing botocore's JSON models is most of the cost of making a client
        global _LOADER
        if _LOADER is None:
            _LOADER = bsession.get_component("data_loader")
        else:
            bsession.register_component("data_loader", _LOADER)
        session = boto3.Session(botocore_session=bsession)
        region = self.region or session.region_name or ("us-east-1" if endpoint else None)
        if probe:
            # the construction check: fail fast (one retry, short timeouts)
            attempts, connect_t, read_t = 2, 2.0, 2.0
        else:
            env_attempts = bsession.get_config_variable("max_attempts")
            attempts = self.max_attempts or (int(env_attempts) if env_attempts else 8)
            connect_t, read_t = self.connect_timeout, self.read_timeout
        mode = bsession.get_config_variable("retry_mode") or "standard"
        if mode == "legacy":
            mode = "standard"
        kw = dict(retries={"mode": mode, "total_max_attempts": int(attempts)},
                  connect_timeout=connect_t, read_timeout=read_t,
                  max_pool_connections=max(POOL_CONNECTIONS, self.max_concurrency * 2))
        if endpoint and _is_custom_endpoint(endpoint):
            kw["s3"] = {"addressing_style": "path"}
            kw["request_checksum_calculation"] = "when_required"
            kw["response_checksum_validation"] = "when_required"
        try:
            return session.client("s3", endpoint_url=endpoint or None, region_name=region,
                                  config=Config(**kw))
        except ValueError as e:  # botocore: "Invalid endpoint: ..."
            raise StoreError(f"invalid S3 endpoint {redact_url(str(endpoint))!r} ({type(e).__name__}); "
                             "give a URL like http://host:9000 as endpoint_url or AWS_ENDPOINT_URL") from None

    @property
    def client(self):
        pid = os.getpid()
        if self._client is None or self._client_pid != pid:  # lazily, once per process (also after fork)
            with self._lock:
                if self._client is None or self._client_pid != pid:
                    self._client = self._make_client()
                    self._client_pid = pid
        return self._client

    def _transfer(self):
        if self._transfer_config is None:
            from boto3.s3.transfer import TransferConfig
            self._transfer_config = TransferConfig(
                multipart_threshold=self.multipart_threshold,
                multipart_chunksize=max(5 * MiB, self.multipart_chunksize),
                max_concurrency=self.max_concurrency, use_threads=self.max_concurrency > 1)
        return self._transfer_config

    def _k(self, key: str) -> str:
        return self._base + check_key(key)

    # -- errors ----------------------------------------------------------------------------------
    def _error(self, e: BaseException, op: str, key: str | None = None) -> StoreError:
        """One line: what failed, and the fix. Never includes credentials: botocore's own texts may
        quote the endpoint as given (user:secret@ and all), so every message is scrubbed."""
        return StoreError(redact_text(str(self._explain(e, op, key)), self._endpoint_arg))

    def _explain(self, e: BaseException, op: str, key: str | None = None) -> StoreError:
        from botocore import exceptions as bx

        what = f"{self.uri}/{key}" if key else self.uri
        if isinstance(e, (bx.NoCredentialsError, bx.PartialCredentialsError)):
            return StoreError(f"no AWS credentials found for {self.uri}; set AWS_ACCESS_KEY_ID and "
                              "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or run with an instance role")
        if isinstance(e, (bx.CredentialRetrievalError, bx.TokenRetrievalError, bx.SSOError)):
            return StoreError(f"could not load AWS credentials for {self.uri} ({type(e).__name__}); "
                              "check AWS_PROFILE and the credential source (log in again for SSO)")
        if isinstance(e, (bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ProxyConnectionError)):
            return StoreError(f"cannot reach the S3 endpoint {self._where()} ({type(e).__name__}) for {op} "
                              f"of {what}; check endpoint_url/AWS_ENDPOINT_URL, the network, and that the "
                              "server is running")
        if isinstance(e, (bx.ReadTimeoutError, bx.ConnectionClosedError, bx.ResponseStreamingError,
                          bx.IncompleteReadError, bx.HTTPClientError)):
            return StoreError(f"the S3 endpoint {self._where()} stopped answering during {op} of {what} "
                              f"({type(e).__name__}); check that the server is running and retry")
        if isinstance(e, bx.ClientError):
            err = e.response.get("Error", {}) or {}
            code = str(err.get("Code") or e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?"))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in _MISSING_BUCKET_CODES or (op == "check" and code in ("404", "NotFound")):
                return StoreError(f"bucket {self.bucket!r} does not exist at {self._where()}; create it "
                                  f"(e.g. `aws s3 mb s3://{self.bucket}`) or fix the store address")
            if code in _AUTH_CODES or status == 403:
                return StoreError(f"access denied ({code}) to {what} at {self._where()}; {_CRED_HINT}")
            if code in ("PermanentRedirect", "301", "AuthorizationHeaderMalformed", "IllegalLocationConstraintException"):
                return StoreError(f"bucket {self.bucket!r} is in another region ({code}); set AWS_REGION "
                                  "or AWS_DEFAULT_REGION to the bucket's region")
            if code in ("SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded",
                        "TooManyRequestsException") or (status and status >= 500):
                return StoreError(f"the S3 endpoint {self._where()} kept failing ({code}) for {op} of {what} "
                                  "after retries; retry later, or lower the number of parallel writers")
            msg = " ".join(str(err.get("Message") or "").split())[:200]
            return StoreError(f"S3 {op} of {what} failed: {code}{': ' + msg if msg else ''}")
        if isinstance(e, bx.ParamValidationError):
            return StoreError(f"invalid S3 request for {op} of {what}: {' '.join(str(e).split())[:200]}")
        if isinstance(e, bx.BotoCoreError):
            return StoreError(f"S3 {op} of {what} failed ({type(e).__name__}): {' '.join(str(e).split())[:200]}")
        return StoreError(f"S3 {op} of {what} failed ({type(e).__name__})")

    def _call(self, op: str, key: str | None, fn, *args, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError
        try:
            return fn(*args, **kwargs)
        except (BotoCoreError, ClientError) as e:
            raise self._error(e, op, key) from None

    # -- the Store interface ---------------------------------------------------------------------
    def check(self, _probe=None) -> None:
        """HEAD the bucket with short timeouts: bad keys, missing bucket or unreachable endpoint
        fail here within seconds with one line."""
        from botocore.exceptions import BotoCoreError, ClientError
        try:
            (_probe or self._make_client(probe=True)).head_bucket(Bucket=self.bucket)
        except (BotoCoreError, ClientError) as e:
            raise self._error(e, "check") from None

    def put(self, key: str, data: bytes) -> None:
        # Atomic visibility: an S3 PUT (and a multipart upload, at CompleteMultipartUpload) makes
        # the object visible whole or not at all, replacing any previous version in one step; readers
        # never see a partial object. So no temp-key-then-rename is needed (S3 has no rename anyway).
        k = self._k(key)
        data = bytes(data) if not isinstance(data, bytes) else data
        extra = {"ContentType": content_type(key)}
        if len(data) < self.multipart_threshold:
            self._call("put", key, self.client.put_object, Bucket=self.bucket, Key=k, Body=data, **extra)
        else:  # multipart, parts in parallel; aborted (no partial object) on failure
            self._call("put", key, self.client.upload_fileobj, io.BytesIO(data), self.bucket, k,
                       ExtraArgs=extra, Config=self._transfer())

    def put_if_absent(self, key: str, data: bytes) -> bool:
        # S3 conditional write (If-None-Match: *; AWS, MinIO, SeaweedFS): 412 when the key exists,
        # 409 when a concurrent conditional write to the same key is in flight; either way we lost
        from botocore.exceptions import BotoCoreError, ClientError
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._k(key), Body=bytes(data),
                                   ContentType=content_type(key), IfNoneMatch="*")
            return True
        except ClientError as e:
            if _code(e) in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                return False
            raise self._error(e, "put", key) from None
        except BotoCoreError as e:
            raise self._error(e, "put", key) from None

    def writer(self, max_inflight: int = 16) -> Writer:
        # boto3 clients are thread-safe: the uploads share this process's client and its connections
        self.client  # noqa: B018 - made once here, not raced by the upload threads
        return Writer(self, min(max_inflight, POOL_CONNECTIONS))

    def get_many(self, keys, max_inflight: int = 16):
        return super().get_many(keys, min(max_inflight, POOL_CONNECTIONS))

    def get(self, key: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError
        k = self._k(key)
        last = None
        for _ in range(3):  # a body stream that breaks mid-way is not retried by botocore: retry here
            try:
                return self.client.get_object(Bucket=self.bucket, Key=k)["Body"].read()
            except ClientError as e:
                if _code(e) in _MISSING_KEY_CODES:
                    raise KeyError(key) from None
                raise self._error(e, "get", key) from None
            except BotoCoreError as e:
                if not _is_stream_error(e):
                    raise self._error(e, "get", key) from None
                last = e
        raise self._error(last, "get", key) from None

    def exists(self, key: str) -> bool:
        return self._head(key) is not None

    def _head(self, key: str) -> dict | None:
        from botocore.exceptions import BotoCoreError, ClientError
        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._k(key))
        except ClientError as e:
            if _code(e) in _MISSING_KEY_CODES:
                return None
            raise self._error(e, "head", key) from None
        except BotoCoreError as e:
            raise self._error(e, "head", key) from None

    def list(self, prefix: str = "") -> list[str]:
        return sorted(self._list(prefix)[0])

    def list_many(self, prefixes, max_inflight: int = 16) -> list[str]:
        """The keys under any of prefixes, the prefixes listed side by side: one LIST is 1,000 keys
        and 50-300 ms, so ImageNet's 1.28M names one page after another would keep the driver
        minutes before the build starts."""
        prefixes = sorted(set(prefixes))
        if len(prefixes) <= 1:
            return self.list(prefixes[0]) if prefixes else []
        with ThreadPoolExecutor(min(max_inflight, POOL_CONNECTIONS), thread_name_prefix="store-list") as pool:
            parts = list(pool.map(lambda p: self._list(p)[0], prefixes))
        return sorted({k for part in parts for k in part})

    def list_level(self, prefix: str = "") -> tuple[list[str], list[str]]:
        """(keys directly under prefix, the "folders" under it, 'a/b/' style), relative to the store:
        a delimited LIST, one page for ImageNet's 1,000 class folders."""
        return self._list(prefix, delimiter="/")

    def _list(self, prefix: str, delimiter: str | None = None) -> tuple[list[str], list[str]]:
        from botocore.exceptions import BotoCoreError, ClientError
        parts = prefix.split("/")
        if prefix.startswith("/") or any(p in (".", "..") for p in parts) or "" in parts[:-1]:
            raise ValueError(f"invalid store key prefix {prefix!r}")
        keys, folders, n = [], [], len(self._base)
        kw = {"Bucket": self.bucket, "Prefix": self._base + prefix, **({"Delimiter": delimiter} if delimiter else {})}
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(**kw):
                for obj in page.get("Contents", ()):
                    k = obj["Key"]
                    if k.startswith(self._base) and not k.endswith("/"):  # skip "folder" markers
                        keys.append(k[n:])
                folders += [c["Prefix"][n:] for c in page.get("CommonPrefixes", ())]
        except (BotoCoreError, ClientError) as e:
            raise self._error(e, "list", prefix or None) from None
        return keys, folders

    def delete(self, key: str) -> None:
        # deleting a missing key is not an error (as LocalStore)
        self._call("delete", key, self.client.delete_object, Bucket=self.bucket, Key=self._k(key))

    def open(self, key: str) -> "S3ReadFile":
        head = self._head(key)
        if head is None:
            raise KeyError(key)
        return S3ReadFile(self, key, int(head["ContentLength"]), head.get("ETag"))


class S3ReadFile(io.RawIOBase):
    """Seekable read-only view of one object: each read is one ranged GET (small reads fetch at
    least `min_fetch` bytes and are served from that block). Parquet readers thus fetch only the
    footer and the row groups/columns they need. `requests` and `bytes_fetched` count the traffic.
    Reads pin the ETag seen at open (If-Match), so a concurrent overwrite fails instead of mixing."""

    def __init__(self, store: S3Store, key: str, size: int, etag: str | None = None,
                 min_fetch: int = 64 * 1024):
        super().__init__()
        self._store, self.key, self.size, self._etag = store, key, size, etag
        self.name = f"{store.uri}/{key}"
        self._pos = 0
        self._min_fetch = min_fetch
        self._block_start, self._block = 0, b""
        self.requests = 0
        self.bytes_fetched = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if self.closed:
            raise ValueError("I/O operation on closed file")
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self.size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if pos < 0:
            raise ValueError("negative seek position")
        self._pos = pos
        return pos

    def _fetch(self, start: int, end: int) -> bytes:
        """Bytes [start, end) with one ranged GET (retried once if the stream breaks)."""
        from botocore.exceptions import BotoCoreError, ClientError
        st = self._store
        kw = {"IfMatch": self._etag} if self._etag else {}
        last = None
        for _ in range(3):
            try:
                self.requests += 1
                body = st.client.get_object(Bucket=st.bucket, Key=st._k(self.key),
                                            Range=f"bytes={start}-{end - 1}", **kw)["Body"].read()
                self.bytes_fetched += len(body)
                return body
            except ClientError as e:
                if _code(e) in _MISSING_KEY_CODES:
                    raise st._error(e, "read", self.key) from None
                if _code(e) in ("PreconditionFailed", "412"):
                    raise StoreError(f"{st.uri}/{self.key} changed while being read; open it again") from None
                raise st._error(e, "read", self.key) from None
            except BotoCoreError as e:
                if not _is_stream_error(e):
                    raise st._error(e, "read", self.key) from None
                last = e
        raise st._error(last, "read", self.key) from None

    def read(self, n: int = -1) -> bytes:
        if self.closed:
            raise ValueError("I/O operation on closed file")
        if n is None or n < 0:
            n = self.size - self._pos
        start = self._pos
        end = min(self.size, start + n)
        if end <= start:
            return b""
        b0, b1 = self._block_start, self._block_start + len(self._block)
        if not (b0 <= start and end <= b1):
            fetch_end = end if end - start >= self._min_fetch else min(self.size, start + self._min_fetch)
            self._block = self._fetch(start, fetch_end)
            self._block_start = b0 = start
            if len(self._block) < end - start:  # short answer: serve what came back
                end = start + len(self._block)
        blk = self._block
        out = blk if (start == b0 and end - start == len(blk)) else blk[start - b0:end - b0]
        if len(out) >= self._min_fetch:  # a big one-off read: don't hold it
            self._block_start, self._block = 0, b""
        self._pos = start + len(out)
        return out

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def close(self):
        self._block = b""
        super().close()


def _code(e) -> str:
    resp = getattr(e, "response", None) or {}
    return str((resp.get("Error") or {}).get("Code") or resp.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))


def _is_stream_error(e) -> bool:
    from botocore import exceptions as bx
    return isinstance(e, (bx.ResponseStreamingError, bx.IncompleteReadError, bx.ReadTimeoutError,
                          bx.ConnectionClosedError))


def _is_custom_endpoint(url: str | None) -> bool:
    if not url:
        return False
    host = (urlsplit(url).hostname or "").lower()
    return not (host.endswith(".amazonaws.com") or host.endswith(".amazonaws.com.cn")
                or host.endswith(".api.aws") or host == "amazonaws.com")


_redact_url = redact_url  # the old private name, for code written before it was shared
