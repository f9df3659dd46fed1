"""CurveZMQ key files for the remote executor, and `aiosched keygen`.

`aiosched keygen --out DIR --name NAME` writes two text files:

- `DIR/NAME.public`: the Z85 public key. Give it to the other side: a worker
  allows an engine with `--allow NAME.public`; an engine names the worker's
  public key file in `remote_server_key`.
- `DIR/NAME.secret`: the public and the secret key, created with mode 0600.
  It never leaves this host. Loading refuses a secret key file that its group or
  other users can read or write.

Format (one `label: value` per line, `#` comments):

    # aiosched CurveZMQ public key: NAME
    public-key: <40 Z85 characters>
"""
from __future__ import annotations

import argparse
import os
import stat
from pathlib import Path

import zmq
from zmq.utils import z85

PUBLIC_SUFFIX = ".public"
SECRET_SUFFIX = ".secret"


def _key_line(label: str, key: bytes) -> str:
    return f"{label}: {key.decode('ascii')}\n"


def generate(out_dir: str | os.PathLike[str], name: str, force: bool = False) -> tuple[Path, Path]:
    """Write NAME.public and NAME.secret (0600) into out_dir; return both paths."""
    if not name or os.sep in name or name.startswith("."):
        raise ValueError(f"--name: {name!r} is not a plain file name")
    out = Path(out_dir)
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    public, secret = zmq.curve_keypair()
    pub_path, sec_path = out / f"{name}{PUBLIC_SUFFIX}", out / f"{name}{SECRET_SUFFIX}"
    for path in (pub_path, sec_path):
        if path.exists() and not force:
            raise ValueError(f"{path} already exists (pass --force to overwrite)")
    _write(sec_path, f"# aiosched CurveZMQ SECRET key: {name}. Keep it on this host, mode 0600.\n"
                     + _key_line("public-key", public) + _key_line("secret-key", secret), 0o600, force)
    _write(pub_path, f"# aiosched CurveZMQ public key: {name}\n" + _key_line("public-key", public), 0o644, force)
    return pub_path, sec_path


def _write(path: Path, text: str, mode: int, force: bool) -> None:
    """Create with the final mode from the start (no window where a secret is readable)."""
    if force and path.exists():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, mode)  # the umask may have removed bits from the public file


def _read_fields(path: str | os.PathLike[str]) -> dict[str, bytes]:
    fields: dict[str, bytes] = {}
    try:
        text = Path(path).read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read key file {path}: {e}") from None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        label, sep, value = line.partition(":")
        if sep:
            fields[label.strip()] = value.strip().encode("ascii")
    return fields


def _checked_key(path: str | os.PathLike[str], fields: dict[str, bytes], label: str) -> bytes:
    key = fields.get(label)
    if key is None:
        raise ValueError(f"key file {path} has no '{label}:' line (written by `aiosched keygen`?)")
    try:
        ok = len(key) == 40 and len(z85.decode(key)) == 32
    except (ValueError, KeyError, IndexError):
        ok = False
    if not ok:
        raise ValueError(f"key file {path}: '{label}' is not a 40-character Z85 CurveZMQ key")
    return key


def load_public_key(path: str | os.PathLike[str]) -> bytes:
    """The Z85 public key in a NAME.public (or NAME.secret) file."""
    return _checked_key(path, _read_fields(path), "public-key")


def check_secret_permissions(path: str | os.PathLike[str]) -> None:
    """Refuse a secret key file that group or others may read or write."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise ValueError(f"cannot read secret key file {path}: {e}") from None
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise ValueError(f"secret key file {path} has mode {mode:04o}: group and others must have no access; "
                         f"run `chmod 600 {path}`")


def load_secret_key(path: str | os.PathLike[str]) -> tuple[bytes, bytes]:
    """(public, secret) Z85 keys from a NAME.secret file, after the permission check."""
    check_secret_permissions(path)
    fields = _read_fields(path)
    public, secret = _checked_key(path, fields, "public-key"), _checked_key(path, fields, "secret-key")
    if zmq.curve_public(secret) != public:
        raise ValueError(f"key file {path}: the public key does not belong to the secret key")
    return public, secret


# ---- `aiosched keygen` ----


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=".", help="directory for the key files (created 0700 if missing)")
    parser.add_argument("--name", required=True, help="base name: writes NAME.public and NAME.secret")
    parser.add_argument("--force", action="store_true", help="overwrite existing files")


def main(args: argparse.Namespace) -> int:
    pub, sec = generate(args.out, args.name, force=args.force)
    print(f"public key: {pub}  (give this to the other side)")
    print(f"secret key: {sec}  (mode 0600; keep it on this host)")
    return 0
