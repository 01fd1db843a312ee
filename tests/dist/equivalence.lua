-- tests/dist/equivalence.lua — (b) k SGD steps data-parallel on N ranks give the weights of one
-- process that trains on the combined batch, within 1e-5 relative.
--
-- Setup (H.equivalence in common.lua): the combined batch of every step (16 samples) is the same
-- on every rank; rank r trains on rows r*16/N+1 .. (r+1)*16/N of it; the loss is the batch mean,
-- so the combined gradient is the average of the ranks' gradients. Rank 0 also trains a reference
-- copy of the model (same seed) on the whole batch in one process, and compares. Models have no BatchNorm (per-rank
-- batch statistics differ from the combined batch's). Reduction order (ordered algorithm): for
-- every gradient element, sum over ranks in rank order 0..N-1 in double, times 1/N, rounded to
-- float once; the remaining differences are float32 rounding inside each rank's batch sums.
-- Tolerance: max|a - b| / max|b| <= 1e-5 for every parameter tensor (reported: the largest seen).
-- Variants: MLP and conv net; ordered (bucketed, tiny buckets so there are several), ordered with
-- overlap (buckets started from per-module backward hooks), and MPI_Allreduce; and a conv net
-- WITH BatchNorm made synchronized (nr.dist.sync_batchnorm), compared against plain BatchNorm on
-- the combined batch, running statistics included.
-- Run: mpirun -np 2 nrlua tests/dist/equivalence.lua
local dist = require 'nr.dist'
local H = require 'tests.dist.common'

dist.init{timeout = 60}

local mlp = function(classes) return H.mlp(1, 20, 32, classes) end
local conv = function(classes) return H.convnet(2, classes) end
H.equivalence('mlp ordered', mlp, {20}, {bucket_mb = 0.002})
H.equivalence('mlp ordered overlap', mlp, {20}, {bucket_mb = 0.002, overlap = true})
H.equivalence('mlp MPI_Allreduce', mlp, {20}, {algo = 'mpi'})
H.equivalence('conv ordered', conv, {3, 8, 8}, {bucket_mb = 0.001, overlap = true})
H.equivalence('conv+BN synchronized', function(classes) return H.convnet_bn(3, classes) end, {3, 8, 8},
   {sync_bn = true, overlap = true, bucket_mb = 0.001})
