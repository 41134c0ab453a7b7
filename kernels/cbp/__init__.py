"""Fused compact bilinear pooling (docs/model.md) by mixed-radix FFTs on tensor-core tiles.

Modules: plan (FFT plans, launch configurations, workspace sizes, the twiddle and
inverse-hash tables, hash checks), kernels and dense (the ``@triton.jit`` functions of the
FFT and the dense path), ops (launchers, the custom ops with their fakes and autograd, the
entry points), sums (the broadcast operands' gradient sums, one launch for both). This
package exports what rwmn.ops and the other kernel modules call; tests reach internals
through the submodules.

Math. With the count sketches p = psi1(x) (p_j = sum_{i: h1(i) = j} s1(i) x_i) and
q = psi2(y), CBP(x, y) = p (*) q, the circular convolution mod D:

    out = IDFT(P Q),                 P = DFT(p), Q = DFT(q)   (length D, no padding).

Backward, with g = dL/dout and G = DFT(g): dL/dp = IDFT(G conj(Q)) / D and dL/dq =
IDFT(G conj(P)) / D (circular correlations), then the transposed sketch dL/dx_i = s1(i)
(dL/dp)[h1(i)], dL/dy_i = s2(i) (dL/dq)[h2(i)].

FFT path (every D whose radix plan, fft_plan, has at most MAX_STAGES radices <= MAX_RADIX:
the model's 300 = 10 x 30 and 4096 = 16 x 16 x 16). With a gradient to come, or broadcast
operands, three kernels:
  1. _cbp_spectra_kernel, launched for x and for y, once per *distinct* input row (a
     broadcast operand, such as the read network's memory, is transformed once, not once
     per output row): the sketches by a deterministic gather-sum over the inverse hash
     (inverse_hash, CSR), O(n + D), no atomics; then the half spectra P [Rx, K], Q [Ry, K]
     (K = D // 2 + 1, fp32), saved for the backward. Two real rows travel as one complex
     sequence z = p_a + i p_b, so one complex FFT yields both spectra (P_a = (Z_k + conj
     Z_{D-k}) / 2, P_b = (Z_k - conj Z_{D-k}) / 2i).
  2. _cbp_product_kernel, per pair of output rows a, b: Z = P_a Q_a / D + i P_b Q_b / D
     rebuilt on all D bins from the half spectra, one inverse FFT, out_a = Re, out_b = Im.
  3. _cbp_bwd_kernel, per pair of output rows: G_a, G_b from one FFT of g_a + i g_b; then for
     each row C = G conj(Q) / D and E = G conj(P) / D, one inverse FFT of C + i E gives the
     two correlations (Re, Im), and the gathers at h1, h2 write the input gradients.

Without a gradient and without broadcasting (the story embedding, whose inputs are data)
one kernel, _cbp_fwd_kernel, does it all per pair of rows: one complex FFT of p_r + i q_r
per row gives P_r and Q_r, and two rows' products travel as one inverse; the spectra stay
in the program's scratch instead of a round trip through device memory.

Each FFT is a self-sorting (Stockham) decimation-in-time transform of mixed radices R_1 ...
R_s (D = prod R_i): stage i, with NS = R_1 ... R_{i-1}, takes for each j < D / R the R inputs
v_t = z[j + t D / R], multiplies them by the twiddles w^{t (j mod NS) D / (NS R)}, applies
the R-point DFT as one [BLOCK_J, R] x [R, R] complex product on tensor cores (three real
products, Gauss's trick: Re = VrWr - ViWi, Im = (Vr + Vi)(Wr + Wi) - VrWr - ViWi), and
stores output u at (j div NS) NS R + (j mod NS) + u NS. Every twiddle and DFT-matrix entry is
an exact integer phase mod D looked up in a table of correctly rounded cos/sin. The work of
a complex transform is D (R_1 + ... + R_s) complex multiply-adds (3 real products each), so
a row costs O(n1 + n2 + D sum R_i) instead of the O(n D) of a dense sketch-DFT.

Dense path (D < plan.FACTORISED_MIN_DIM, or a D with a prime factor > MAX_RADIX such as a large
prime). The sketch followed by the DFT is a fixed linear map, X_k = sum_i s1(i) x_i w^{h1(i)
k}, so one program of BLOCK_R rows contracts its rows with twiddle tiles built on the fly in
registers (the "sketch-DFT"), stores the weighted products c_k X_k Y_k (c_k = 1/D for bins 0
and D/2, else 2/D: the Hermitian half spectrum) in a per-row workspace and contracts it with
the inverse twiddles; backward likewise with G conj(Y), G conj(X) evaluated at the hashes.
_cbp_dense_spectra_kernel (op ``rwmn::cbp_dense_spectra``, no autograd) writes the half
spectra of one operand's rows the same way: the read network's memory spectra
(kernels/read_network.py), a few hundred rows computed once per forward.

Scratch. The FFT kernels stage each transform through a per-program scratch area in device
memory (2 complex D-vectors for the spectra and product kernels, 3 for the backward and
the forward-only kernel), reused for every pair of rows the program
owns; pairs_per_program keeps a launch's scratch within SCRATCH_BUDGET so it stays in L2.

Inputs are read as stored (fp32, bf16 or fp16); products accumulate in fp32. Under autocast
the inputs are cast to the autocast dtype first (custom ops have no autocast rule).

Custom ops. ``rwmn::cbp_fft`` / ``rwmn::cbp_fft_backward`` and ``rwmn::cbp_fft_forward``
(forward only, no autograd) for the FFT path, ``rwmn::cbp_dense``
/ ``rwmn::cbp_dense_backward`` are ``torch.library.triton_op``s launched through
``wrap_triton`` with ``register_autograd``, so ``torch.compile(fullgraph=True)`` traces them
without a graph break.

May import: kernels.cbp.kernels, kernels.cbp.ops, kernels.cbp.plan.
"""

from kernels.cbp.kernels import twiddle
from kernels.cbp.ops import cbp, cbp_with_vjp
from kernels.cbp.plan import cached_twiddles, check_hash, half_spectrum

__all__ = ["cached_twiddles", "cbp", "cbp_with_vjp", "check_hash", "half_spectrum", "twiddle"]
