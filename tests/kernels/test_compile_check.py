"""compile_check's SASS reading (the part of the sm_90 report that needs no compiler): loops, wgmma
counts, 0-pending waits and the opcode histogram, on a hand-written nvdisasm listing."""
from __future__ import annotations

from gafh_fast.kernels.compile_check import opcode_counts, sass_loops

LISTING = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_3:
        /*0010*/                   IMAD R4, R2, R3, R5 ;
        /*0020*/              @!P0 IMAD.MOV R6, RZ, RZ, R7 ;
        /*0030*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR12].tnspA.tnspB, R24 ;
        /*0040*/                   ISETP.GE.AND P1, PT, R4, R8, PT ;
        /*0050*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR14].tnspA.tnspB, R24, gsb0 ;
        /*0060*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0070*/               @P1 BRA `(.L_x_3) ;
.L_x_4:
        /*0080*/                   IADD3 R9, R9, 0x1, RZ ;
        /*0090*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;
        /*00a0*/              @!P2 BRA `(.L_x_4) ;
        /*00b0*/                   EXIT ;
"""


def test_loops_with_wgmma_their_waits_and_opcodes():
    loops = sass_loops(LISTING)
    assert len(loops) == 1  # the second loop has no HGMMA: not a GEMM main loop
    loop = loops[0]
    assert (loop["instructions"], loop["hgmma"], loop["waits_0"]) == (7, 2, 1)
    # predicates and modifiers stripped; the back branch counts as an issue slot
    assert loop["opcodes"] == {"IMAD": 2, "HGMMA": 2, "ISETP": 1, "WARPGROUP": 1, "BRA": 1}


def test_opcode_counts_most_frequent_first():
    counts = opcode_counts(["@UP0 SEL R1, R2, RZ, P0", "SEL R3, RZ, 0x10, P1", "LDGSTS.E.BYPASS.128 [R1], desc[UR4][R2.64]"])
    assert list(counts.items()) == [("SEL", 2), ("LDGSTS", 1)]


def test_a_retry_block_after_exit_is_not_a_loop():
    """TMA pipelines put an mbarrier try-wait retry after EXIT that branches back into the main loop; the
    span it closes holds the epilogue's final 0-pending wait, which is not inside any loop."""
    listing = """
.L_x_9:
        /*0000*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24, gsb0 ;
        /*0010*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;
        /*0020*/               @P0 BRA `(.L_x_9) ;
        /*0030*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0040*/                   EXIT ;
        /*0050*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR10], R3 ;
        /*0060*/                   BRA `(.L_x_9) ;
"""
    assert [(lp["instructions"], lp["hgmma"], lp["waits_0"]) for lp in sass_loops(listing)] == [(3, 1, 0)]
