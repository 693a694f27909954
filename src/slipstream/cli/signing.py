"""`slipstream sign`, `verify` and `keygen`: OpenSSF model signatures of bundles (slipstream.artifact.signing)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from slipstream.cli.output import console, print_json, reporting

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


def sign_command(
    bundle: Annotated[Path, typer.Argument(help="A bundle directory (verified before it is signed).")],
    key: Annotated[Path, typer.Option("--key", help="The PEM elliptic-curve private key (from `slipstream keygen`).")],
    certificate: Annotated[
        Path | None,
        typer.Option(help="Sign in certificate mode: the PEM signing certificate of --key, carried in the signature."),
    ] = None,
    certificate_chain: Annotated[
        list[Path] | None, typer.Option(help="Intermediate certificates to carry with --certificate; repeatable.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Sign every file of a bundle (manifest and profile included) into BUNDLE/model.sig, offline.

    The signature is the OpenSSF model-signing format: `model_signing verify key` accepts it too. Keyless Sigstore
    signing (an OIDC identity, a transparency log) needs network access: use the model_signing CLI for it.
    """
    from slipstream.artifact.signing import sign_bundle

    with reporting(as_json=as_json):
        path = sign_bundle(bundle, key, certificate=certificate, certificate_chain=tuple(certificate_chain or ()))
    if as_json:
        print_json({"signature": str(path)})
    else:
        console.print(f"[green]✓[/] signed [bold]{bundle}[/]: {path}", highlight=False)


def verify_command(
    bundle: Annotated[Path, typer.Argument(help="A signed bundle directory.")],
    key: Annotated[
        Path | None, typer.Option("--key", help="The PEM public key the signature must verify with.")
    ] = None,
    certificate: Annotated[
        list[Path] | None,
        typer.Option(help="Instead of --key: a PEM CA certificate the signing certificate must chain to; repeatable."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Check a bundle's signature: made by the key (or a certificate of the chain), covering every file unchanged.

    Also checks every file against the manifest, as loading does. Exits 1 naming the file or key that failed.
    """
    from slipstream.artifact import Bundle
    from slipstream.artifact.signing import TrustAnchor, check_signed_manifest, verify_bundle

    with reporting(as_json=as_json):
        anchor = TrustAnchor(public_key=key, certificate_chain=tuple(certificate or ()))
        signed = verify_bundle(bundle, anchor)
        loaded = Bundle.load(bundle)
        check_signed_manifest(bundle, signed, loaded.manifest)
    files = sorted(signed.digests)
    if as_json:
        print_json({"bundle": str(bundle), "verified": True, "trust": anchor.describe(), "files": files})
    else:
        console.print(
            f"[green]✓[/] {bundle}: signature by {anchor.describe()} verified over {len(files)} files "
            f"({', '.join(files)})",
            highlight=False,
        )


def keygen_command(
    private_key: Annotated[Path, typer.Option("--private", help="Where to write the private key (mode 0600).")] = Path(
        "private.pem"
    ),
    public_key: Annotated[Path, typer.Option("--public", help="Where to write the public key.")] = Path("public.pem"),
) -> None:
    """Make an ECDSA P-256 key pair for `slipstream sign` (private) and `verify`/`serve --trusted-key` (public).

    The same as `openssl ecparam -name prime256v1 -genkey -noout -out private.pem` followed by
    `openssl ec -in private.pem -pubout -out public.pem`. Keep the private key off the serving machines.
    """
    from slipstream.artifact.signing import generate_key_pair

    with reporting(as_json=False):
        generate_key_pair(private_key, public_key)
    console.print(f"[green]✓[/] wrote {private_key} (keep it secret) and {public_key}", highlight=False)
