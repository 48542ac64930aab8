"""Deployment across sites: certificates and keys, SuperLink and SuperNode launchers.

The same ServerApp and ClientApp as the simulation run on Flower's SuperLink (the platform) and
SuperNodes (the partners), over TLS with SuperNode authentication. See docs/partner-site.md.
"""

from fedrec.deploy.certdir import CertDir, read_manifest
from fedrec.deploy.certs import init_certs
from fedrec.deploy.errors import DeployError
from fedrec.deploy.partners import add_partner, export_partner

__all__ = ["CertDir", "DeployError", "add_partner", "export_partner", "init_certs", "read_manifest"]
