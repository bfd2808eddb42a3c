"""
The Celery app of the bench's ``celery-round-trip`` case, for the worker
(``celery -A signedqueue._bench_celery worker``) and for the client.

Everything is configured from environment variables (see :func:`environ`), so
the worker process and the client build the same app:

``signed``
    signedqueue's serializer (:func:`signedqueue.transports.celery.setup`).
``plain``
    Celery's ``json`` serializer for tasks and results.
``celery-auth``
    Celery's ``auth`` serializer: every task message signed with an RSA key
    and a self-signed certificate (``app.setup_security()``), json inside;
    results in plain json, as ``auth`` signs only task messages.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

VARIANT = "SIGNEDQUEUE_BENCH_CELERY_VARIANT"
BROKER = "SIGNEDQUEUE_BENCH_CELERY_BROKER"
PREFIX = "SIGNEDQUEUE_BENCH_CELERY_PREFIX"
DIRECTORY = "SIGNEDQUEUE_BENCH_CELERY_DIR"
KEYRING = "SIGNEDQUEUE_BENCH_CELERY_KEYRING"

TASK = "signedqueue_bench.echo"


def queue_name(prefix: str, variant: str) -> str:
    return f"{prefix}-{variant}"


def environ(variant: str, broker: str, prefix: str, directory: str,
            keyring_path: str) -> dict[str, str]:
    """The environment that selects *variant* (certificates made on first use)."""
    if variant == "celery-auth":
        _certificate(Path(directory))
    return {VARIANT: variant, BROKER: broker, PREFIX: prefix, DIRECTORY: directory,
            KEYRING: keyring_path}


def _certificate(directory: Path) -> None:
    """A private key and a self-signed certificate for the auth serializer."""
    key_path, cert_dir = directory / "auth.key", directory / "certs"
    if key_path.exists():
        return
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "signedqueue-bench")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    cert_dir.mkdir(mode=0o700, exist_ok=True)
    pem = cert.public_bytes(serialization.Encoding.PEM)
    (cert_dir / "bench.pem").write_bytes(pem)
    (directory / "auth.pem").write_bytes(pem)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))


def make_app(env: Mapping[str, str]) -> Any:
    """The app *env* describes, with the echo task registered."""
    from celery import Celery

    variant, broker = env[VARIANT], env[BROKER]
    app = Celery("signedqueue_bench", broker=broker, backend=broker, set_as_current=False)
    app.conf.update(
        task_default_queue=queue_name(env[PREFIX], variant),
        result_expires=600,
        broker_connection_retry_on_startup=True,
        worker_prefetch_multiplier=16,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
    )
    if variant == "signed":
        from ._codec import Codec
        from ._keys import Keyring
        from .transports.celery import setup

        setup(app, Codec(Keyring.from_file(env[KEYRING])))
    elif variant == "celery-auth":
        directory = Path(env[DIRECTORY])
        app.conf.update(
            task_serializer="auth",
            accept_content=["auth"],
            security_key=str(directory / "auth.key"),
            security_certificate=str(directory / "auth.pem"),
            security_cert_store=str(directory / "certs" / "*.pem"),
            security_digest="sha256",
        )
        app.setup_security(allowed_serializers=["json", "application/json"])
    elif variant != "plain":
        raise ValueError(f"unknown celery bench variant {variant!r}")

    @app.task(name=TASK)  # type: ignore[untyped-decorator]
    def echo(value: Any) -> Any:
        return value

    return app


def __getattr__(name: str) -> Any:
    # ``celery -A signedqueue._bench_celery`` looks for ``app``.
    if name == "app":
        return make_app(os.environ)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
