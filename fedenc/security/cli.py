"""``fedenc certs``: create a CA, issue, revoke and list certificates.

Registered in :mod:`fedenc.cli` with ``app.add_typer(certs_app, name="certs")``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from fedenc.security.defaults import (
    CA_DAYS,
    CHILD_DAYS,
    DEFAULT_CERTS_DIR,
    DEFAULT_MASTER_HOSTS,
    MASTER_DAYS,
)
from fedenc.security.errors import SecurityError

# The commands import their machinery (cryptography) when they run: `fedenc --help` stays fast.

certs_app = typer.Typer(
    help="Certificates for mutual TLS: a CA, the master's and each child's certificate, "
    "revocation. See docs/security.md.",
    no_args_is_help=True,
)
err_console = Console(stderr=True)

DirOption = Annotated[
    Path,
    typer.Option("--dir", help="Certificates directory (see docs/security.md for the layout)."),
]
ForceOption = Annotated[bool, typer.Option("--force", help="Overwrite existing private keys.")]
HostsOption = Annotated[
    list[str] | None,
    typer.Option(
        "--master-host",
        help="DNS name or IP address children dial (repeat; default localhost and 127.0.0.1).",
    ),
]


def _fail(err: Exception) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {err}")
    return typer.Exit(code=2)


@certs_app.command("init")
def init_cmd(
    dir: DirOption = DEFAULT_CERTS_DIR,
    master_host: HostsOption = None,
    days: Annotated[int, typer.Option(min=1, help="Master certificate validity.")] = MASTER_DAYS,
    ca_days: Annotated[int, typer.Option(min=1, help="CA validity.")] = CA_DAYS,
    force: ForceOption = False,
) -> None:
    """Create a CA, an empty revocation list and the master's certificate."""
    from fedenc.security.layout import CertLayout
    from fedenc.security.store import init_certs

    layout = CertLayout(dir)
    hosts = master_host or list(DEFAULT_MASTER_HOSTS)
    try:
        init_certs(layout, master_hosts=hosts, days=days, ca_days=ca_days, force=force)
    except (SecurityError, ValueError, OSError) as err:
        raise _fail(err) from err
    err_console.print(
        f"CA and master certificate ({', '.join(hosts)}) written to {layout.root}; "
        f"keep {layout.ca_key.name} off the nodes if you can. "
        f"Next: `fedenc certs issue NAME --dir {layout.root}` for each child."
    )


@certs_app.command("master")
def master_cmd(
    dir: DirOption = DEFAULT_CERTS_DIR,
    master_host: HostsOption = None,
    days: Annotated[int, typer.Option(min=1, help="Validity in days.")] = MASTER_DAYS,
    force: ForceOption = False,
) -> None:
    """Reissue the master's certificate (new host names, renewal) with the existing CA."""
    from fedenc.security.layout import CertLayout
    from fedenc.security.store import issue_master

    layout = CertLayout(dir)
    hosts = master_host or list(DEFAULT_MASTER_HOSTS)
    try:
        issue_master(layout, master_hosts=hosts, days=days, force=force)
    except (SecurityError, ValueError, OSError) as err:
        raise _fail(err) from err
    err_console.print(f"master certificate ({', '.join(hosts)}) written to {layout.master_cert}")


@certs_app.command("issue")
def issue_cmd(
    name: Annotated[str, typer.Argument(help="Child name (letters, digits, . _ -).")],
    dir: DirOption = DEFAULT_CERTS_DIR,
    days: Annotated[int, typer.Option(min=1, help="Validity in days.")] = CHILD_DAYS,
    force: ForceOption = False,
) -> None:
    """Issue a child's client certificate (children/NAME.pem and NAME.key)."""
    from fedenc.security.layout import CertLayout
    from fedenc.security.store import issue_child

    layout = CertLayout(dir)
    try:
        issued = issue_child(layout, name, days=days, force=force)
    except (SecurityError, ValueError, OSError) as err:
        raise _fail(err) from err
    err_console.print(
        f"child {name!r}: {layout.child_cert(name)} and {layout.child_key(name).name} "
        f"(serial {issued.cert.serial_number:x}, "
        f"expires {issued.cert.not_valid_after_utc:%Y-%m-%d}). "
        f"Copy them with {layout.ca_cert.name} to the machine that uses them."
    )


@certs_app.command("request")
def request_cmd(
    name: Annotated[str, typer.Argument(help="This child's name (letters, digits, . _ -).")],
    dir: DirOption = DEFAULT_CERTS_DIR,
    force: ForceOption = False,
) -> None:
    """On a child's site: make its key and a certificate signing request (the key stays here)."""
    from fedenc.security.layout import CertLayout
    from fedenc.security.store import request_child

    layout = CertLayout(dir)
    try:
        csr = request_child(layout, name, force=force)
    except (SecurityError, ValueError, OSError) as err:
        raise _fail(err) from err
    err_console.print(
        f"child {name!r}: key {layout.child_key(name)} (keep it here) and request {csr}. Send "
        f"{csr.name} to the federation's operator (`fedenc certs sign {csr.name} --name {name}`), "
        "then put "
        f"the {name}.pem it returns next to the key, and the federation's ca.pem in {dir}."
    )


@certs_app.command("sign")
def sign_cmd(
    request: Annotated[Path, typer.Argument(help="A child's request (`fedenc certs request`).")],
    name: Annotated[
        str,
        typer.Option(
            "--name", help="The child the request must be for (a file's name proves nothing)."
        ),
    ],
    dir: DirOption = DEFAULT_CERTS_DIR,
    days: Annotated[int, typer.Option(min=1, help="Validity in days.")] = CHILD_DAYS,
    out: Annotated[
        Path | None, typer.Option(help="Where to write the certificate (default: REQUEST.pem).")
    ] = None,
    force: Annotated[
        bool,
        typer.Option("--force", help="Replace (and revoke) the child's current certificate."),
    ] = False,
) -> None:
    """On the operator's machine: sign a child's request with the CA (no key is made or seen)."""
    from fedenc.security.layout import CertLayout
    from fedenc.security.store import sign_request

    layout = CertLayout(dir)
    try:
        cert, target, revoked = sign_request(layout, request, name, days=days, out=out, force=force)
    except (SecurityError, ValueError, OSError) as err:
        raise _fail(err) from err
    if revoked is not None:
        err_console.print(f"child {name!r}: the certificate it had (serial {revoked:x}) is revoked")
    if name == "operator":  # DEFAULT_OPERATORS: a served master gives it the operators' rights
        err_console.print(
            "[yellow]note[/]: 'operator' is a served master's default operator name: this "
            "certificate may submit, cancel and list jobs (fedenc master --operators)"
        )
    err_console.print(
        f"child {name!r}: certificate {target} (serial {cert.serial_number:x}, expires "
        f"{cert.not_valid_after_utc:%Y-%m-%d}). Send it with {layout.ca_cert.name} back to the "
        "child."
    )


@certs_app.command("revoke")
def revoke_cmd(
    name: Annotated[
        str | None, typer.Argument(help="Child whose current certificate to revoke.")
    ] = None,
    dir: DirOption = DEFAULT_CERTS_DIR,
    serial: Annotated[
        str | None, typer.Option(help="Revoke this serial (hex) instead, e.g. a lost certificate.")
    ] = None,
) -> None:
    """Add a child's certificate to the revocation list (crl.pem); the master reloads it."""
    from fedenc.security.layout import CertLayout
    from fedenc.security.store import revoke_child

    if (name is None) == (serial is None):
        raise _fail(ValueError("give either a child NAME or --serial, not both"))
    layout = CertLayout(dir)
    try:
        number = int(serial, 16) if serial is not None else None
        revoked = revoke_child(layout, name, serial=number)
    except (SecurityError, ValueError, OSError) as err:
        raise _fail(err) from err
    who = f"child {name!r}" if name else "certificate"
    err_console.print(f"{who} (serial {revoked:x}) revoked in {layout.crl}")


@certs_app.command("list")
def list_cmd(dir: DirOption = DEFAULT_CERTS_DIR) -> None:
    """Table of the master's and children's certificates: serial, expiry, revocation."""
    from rich.table import Table

    from fedenc.security.layout import CertLayout
    from fedenc.security.store import list_certificates

    try:
        rows = list_certificates(CertLayout(dir))
    except (SecurityError, ValueError, OSError) as err:
        raise _fail(err) from err
    table = Table(title=f"certificates in {dir}")
    table.add_column("name", no_wrap=True, min_width=max(len(r.name) for r in rows))
    table.add_column("role", no_wrap=True)
    table.add_column("serial", overflow="fold")  # full hex: what `revoke --serial` takes
    table.add_column("expires (UTC)", no_wrap=True)
    table.add_column("status", no_wrap=True)
    for row in rows:
        if row.revoked is not None:
            status = f"[red]revoked {row.revoked:%Y-%m-%d}[/]"
        elif row.expired:
            status = "[yellow]expired[/]"
        else:
            status = "[green]valid[/]"
        table.add_row(row.name, row.role, f"{row.serial:x}", f"{row.not_after:%Y-%m-%d}", status)
    Console().print(table)
