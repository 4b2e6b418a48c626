"""From a physical path or URL back to a replica's pfn (``common.catalogue.physical``), for posix
roots and remote endpoints' URLs."""

from __future__ import annotations

import pytest

from common.catalogue.physical import relative_pfn

XROOTD = "root://eos.example.org:1094//eos/spool/"
DAVS = "davs://dcache.example.org:2880/pnfs/spool"


@pytest.mark.parametrize(
    ("root", "physical", "pfn"),
    [
        ("/srv/disk1", "/srv/disk1/lst1/a.fits", "lst1/a.fits"),
        ("/srv/disk1/", "/srv//disk1/./lst1/a.fits", "lst1/a.fits"),
        ("/srv/disk1", "file:///srv/disk1/lst1/a.fits", "lst1/a.fits"),
        ("/srv/disk1", "lst1/a.fits", "lst1/a.fits"),
        ("/srv/disk1", "/srv/disk1", None),
        ("/srv/disk1", "/srv/disk10/a", None),
        ("/srv/disk1", "/srv/disk1/../etc/passwd", None),
        ("/srv/disk1", "lst1/../../a", None),
        ("/srv/disk1", "/srv/disk1/a\x00b", None),
        ("/srv/disk1", "", None),
        ("/srv/disk1", "root://host//srv/disk1/a", None),
        (XROOTD, "root://eos.example.org:1094//eos/spool/lst1/a.fits", "lst1/a.fits"),
        (XROOTD, "xroot://EOS.example.org:1094//eos/spool/lst1/a.fits", "lst1/a.fits"),
        (XROOTD, "root://eos.example.org:1095//eos/spool/lst1/a.fits", None),  # another port
        (XROOTD, "root://other.example.org:1094//eos/spool/lst1/a.fits", None),
        (XROOTD, "root://eos.example.org:1094//eos/spoolx/a.fits", None),
        (XROOTD, "davs://eos.example.org:1094/eos/spool/a.fits", None),  # another protocol
        (XROOTD, "/eos/spool/lst1/a.fits", "lst1/a.fits"),  # the server's own path
        (DAVS, "https://dcache.example.org:2880/pnfs/spool/lst1/a.fits", "lst1/a.fits"),
        (DAVS, "gsiftp://dcache.example.org:2880/pnfs/spool/lst1/a.fits", None),
    ],
)
def test_relative_pfn(root: str, physical: str, pfn: str | None) -> None:
    assert relative_pfn(root, physical) == pfn
