"""`difftumor study {create,read,report,export}`: blinded reader studies (Visual Turing Test).

The group is registered here; the subcommands and handlers live in :mod:`study.cli`.
"""

from __future__ import annotations


def register(sub) -> None:
    from study.cli import add_commands

    parser = sub.add_parser(
        "study",
        help="blinded reader studies: create, read, report, export",
        description="Visual Turing Test: readers tell real from synthetic tumors; Table-1 statistics.",
    )
    group = parser.add_subparsers(dest="study_command", metavar="ACTION", required=True)
    add_commands(group)
