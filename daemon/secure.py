"""The trail and its secrets: readable only by root and the control group, whichever way the
daemon is started (the quick start, a unit file, a container, a test).

Run before the daemon writes anything:
- new files and directories get no permission for others (umask 027);
- the embedded store's directory and the spool directory: owned by root and the control group,
  0750 (the person being audited must not read what was recorded of them);
- the masking key: 0600, root's;
- the config (ClickHouse password, webhook URL): 0640, root and the control group;
- the config, the key and the policy must not be writable by anyone but root (and, for the
  config and policy, the control group): whoever can write one can rewrite the rules, point the
  trail elsewhere or learn how secrets are masked.  The daemon refuses to start on such a file,
  and on one (or a store or spool directory) in a directory another user owns or others can
  write without the sticky bit (it could be replaced).
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from urllib.parse import urlparse

from agentwarden.core import identity
from agentwarden.daemon.config import Config

log = logging.getLogger(__name__)

UMASK = 0o027


class InsecureSetup(RuntimeError):
    """A file the daemon trusts can be changed by someone it does not."""


def prepare(cfg: Config) -> None:
    """Check and fix the permissions of everything the daemon reads or writes; raises
    InsecureSetup for a file it must not trust."""
    os.umask(UMASK)
    gid = identity.group_gid(cfg.control_group) or 0   # no such group: root only
    if cfg.source:
        _trusted(Path(cfg.source), "config", gid)
        _restrict(Path(cfg.source), 0o640, gid, "config")
    if cfg.enforce.policy_file and Path(cfg.enforce.policy_file).exists():
        _trusted(Path(cfg.enforce.policy_file), "policy", gid)
    if cfg.store.dsn_file:   # a ClickHouse password: root's alone, as the masking key
        _trusted(Path(cfg.store.dsn_file), "store DSN file", 0)
        _restrict(Path(cfg.store.dsn_file), 0o600, 0, "store DSN file", secret=True)
    _kept(Path(cfg.mask.key_file), "masking key", 0o600, 0)
    if cfg.store.dsn.startswith("chdb://") and urlparse(cfg.store.dsn).path:
        _private_dir(Path(urlparse(cfg.store.dsn).path), gid, "store")
    _private_dir(Path(cfg.store.spool_dir), gid, "spool")
    state = Path(cfg.enforce.state_file)
    if state.exists():
        _restrict(state, 0o640, gid, "approvals state")
    # the chain's signing key signs checkpoints: root's alone; its state says where the chain is
    if cfg.chain.enabled:
        for name, what, mode, group in ((cfg.chain.key_file, "chain signing key", 0o600, 0),
                                        (cfg.chain.state_file, "chain state", 0o600, 0),
                                        (cfg.chain.anchor_file, "checkpoint anchor", 0o640, gid)):
            if name:
                _kept(Path(name), what, mode, group)
    # who is bound to which uid: a user who could write it would verify their own sessions
    _kept(Path(cfg.identity.state_file), "identity bindings", 0o600, 0)
    for what, name in (("identity provider JWKS", cfg.identity.oidc.jwks_file),
                       ("identity provider CA", cfg.identity.oidc.ca_file)):
        if name and Path(name).exists():   # who may sign tokens: root's, written by nobody else
            _trusted(Path(name), what, gid)


def _kept(path: Path, what: str, mode: int, gid: int) -> None:
    """A file the daemon keeps (a key, a state): root's, written by nobody else, at most `mode`
    (0600: a secret); while it does not exist yet, its directory must be one nobody else can
    plant it in."""
    if path.exists():
        _trusted(path, what, gid)
        _restrict(path, mode, gid, what, secret=mode == 0o600)
    else:
        _trusted_dir(path.parent, what)


def _read_only(path: Path) -> bool:
    """On a read-only mount (a Kubernetes ConfigMap or Secret volume) nobody writes, whatever the
    mode bits say."""
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _trusted(path: Path, what: str, gid: int) -> None:
    """Root's, and written by nobody else.  Checked on read-only mounts too: under the systemd
    unit's ProtectSystem= /etc is read-only for the daemon alone, and writable outside it (red
    team); a ConfigMap's files are root's and 0644, which passes."""
    st = path.stat()
    if st.st_uid != 0:
        raise InsecureSetup(f"{what} {path} belongs to uid {st.st_uid}: it must be root's "
                            f"(chown root {path})")
    if st.st_mode & stat.S_IWOTH or (st.st_mode & stat.S_IWGRP and st.st_gid not in (0, gid)):
        raise InsecureSetup(f"{what} {path} can be written by others (mode {stat.filemode(st.st_mode)}, "
                            f"group {st.st_gid}): chmod go-w {path}")
    _trusted_dir(path.parent, what)


def _trusted_dir(directory: Path, what: str) -> None:
    """A directory another user owns, or others may write without the sticky bit, lets them
    replace (or remove) what is in it."""
    try:
        st = directory.stat()
    except FileNotFoundError:
        return
    if st.st_uid != 0:
        raise InsecureSetup(f"the {what}'s directory {directory} belongs to uid {st.st_uid}: what is in it "
                            "could be replaced or removed by that user")
    # a read-only mount's directory (a ConfigMap volume's is 0777) is written by nobody: only there
    # the mode bits do not count
    if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX and not _read_only(directory):
        raise InsecureSetup(f"the {what}'s directory {directory} can be written by anyone "
                            f"(mode {stat.filemode(st.st_mode)}): its files could be replaced")


def _restrict(path: Path, mode: int, gid: int, what: str, secret: bool = False) -> None:
    st = path.stat()
    if stat.S_IMODE(st.st_mode) & ~mode or st.st_gid not in (0, gid):
        try:
            os.chown(path, 0, gid)
            os.chmod(path, mode)
        except OSError as e:   # a read-only mount: a volume of the daemon's pod, or /etc under ProtectSystem=
            if secret and st.st_mode & 0o077 & ~mode:
                raise InsecureSetup(f"{what} {path} is readable by others (mode "
                                    f"{stat.filemode(st.st_mode)}) and cannot be changed here "
                                    f"({e.strerror}): chmod {mode:o} {path}") from None
            log.warning("%s %s is mode %s and cannot be changed: %s", what, path,
                        stat.filemode(st.st_mode), e.strerror)
            return
        log.warning("%s %s was mode %s: now %s root:%d", what, path, stat.filemode(st.st_mode),
                    stat.filemode(stat.S_IFREG | mode), gid)


def _private_dir(path: Path, gid: int, what: str) -> None:
    _trusted_dir(path.parent, what)   # else its owner could swap the directory for a link of theirs
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o750)
        st = path.stat()
    except OSError as e:   # not a directory, a read-only mount: the store or spool reports it itself
        log.warning("cannot make the %s directory %s private: %s", what, path, e)
        return
    if stat.S_IMODE(st.st_mode) & 0o027 or st.st_uid != 0 or st.st_gid != gid:
        os.chown(path, 0, gid)
        os.chmod(path, 0o750)
        if stat.S_IMODE(st.st_mode) & 0o007:
            log.warning("the %s directory %s was mode %s: now drwxr-x--- root:%d", what, path,
                        stat.filemode(st.st_mode), gid)
