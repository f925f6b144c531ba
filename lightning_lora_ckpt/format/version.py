"""The package version, recorded in every manifest's ``versions``."""

__version__ = "0.1.0"
