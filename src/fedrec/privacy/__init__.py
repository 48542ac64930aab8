"""Differential privacy for fedrec: noise calibration, accountant state, ledger and audits.

Pure math lives in ``accounting`` and ``empirical``; state in ``state``; the hash-chained
ledger in ``entry`` and ``ledger``; the independent recomputation in ``audit``. No Flower here.
"""

from fedrec.privacy.accounting import (
    MAX_NOISE_MULTIPLIER,
    RDP_ORDERS,
    History,
    HistoryItem,
    calibrate_noise,
    canonical_history,
    epsilon_dp_accounting,
    epsilon_opacus,
    validate_budget,
)
from fedrec.privacy.audit import (
    COMPOSED,
    TABLE_COLUMNS,
    AuditResult,
    AuditRow,
    Tolerance,
    audit_ledger,
    format_table,
    write_audit,
)
from fedrec.privacy.empirical import (
    epsilon_lower_bound_from_scores,
    one_run_lower_bound,
    p_value_one_run,
)
from fedrec.privacy.entry import MECHANISMS, UNITS, LedgerEntry
from fedrec.privacy.errors import PrivacyError
from fedrec.privacy.ledger import (
    LEDGER_FILENAME,
    ChainReport,
    Ledger,
    LedgerError,
    genesis_hash,
    read_ledger,
    verify_chain,
)
from fedrec.privacy.state import ClientPrivacyState

__all__ = [
    "COMPOSED",
    "LEDGER_FILENAME",
    "MAX_NOISE_MULTIPLIER",
    "MECHANISMS",
    "RDP_ORDERS",
    "TABLE_COLUMNS",
    "UNITS",
    "AuditResult",
    "AuditRow",
    "ChainReport",
    "ClientPrivacyState",
    "History",
    "HistoryItem",
    "Ledger",
    "LedgerEntry",
    "LedgerError",
    "PrivacyError",
    "Tolerance",
    "audit_ledger",
    "calibrate_noise",
    "canonical_history",
    "epsilon_dp_accounting",
    "epsilon_lower_bound_from_scores",
    "epsilon_opacus",
    "format_table",
    "genesis_hash",
    "one_run_lower_bound",
    "p_value_one_run",
    "read_ledger",
    "validate_budget",
    "verify_chain",
    "write_audit",
]
