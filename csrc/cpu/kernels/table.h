// table.h — included last by each isa_*.cpp: every kernel of this ISA, gathered in the table dispatch.cpp picks.
#include "vec.h"
#include "layernorm.h"
#include "gelu.h"
#include "embedding.h"
#include "matmul.h"
#include "matmul_nt.h"
#include "matmul_lowp.h"
#include "attention.h"
#include "peak.h"

#define GK_CAT2(a, b) a##b
#define GK_CAT(a, b) GK_CAT2(a, b)
#define GK_STR2(a) #a
#define GK_STR(a) GK_STR2(a)

namespace gk {
extern const KernelTable GK_CAT(kTable_, GK_ISA) = {
    GK_STR(GK_ISA),
    GK_ISA::layer_norm_rows,
    GK_ISA::add_layer_norm_rows,
    GK_ISA::gelu_new,
    GK_ISA::embedding_rows,
    GK_ISA::matmul_panel,
    GK_ISA::gemv_rows,
    GK_ISA::matmul_nt,
    GK_ISA::matmul_panel_lowp,
    GK_ISA::unpack_panel,
    GK_ISA::attention_block,
    GK_MR_MAX,
    GK_KN_GEMV_ROWS,
    GK_ISA::VL,
    GK_ISA::fma_probe,
};
}  // namespace gk
