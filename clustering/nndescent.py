"""pynndescent's NN-descent for the clustering job's cosine graph, in a form numba can keep in its cache.

The job's neighbour graph is pynndescent's ``nn_descent``; numba compiled it again in every process —
24 s of a 100k clustering run on a 2-core machine, warm cache or not — and refused to cache it ("uses
dynamic globals") for two reasons, each checked on a small case: ``nn_descent`` and ``nn_descent_internal``
call ``numba.get_num_threads()`` in compiled code (lowered to a process-specific address), and the
distance function is passed as an argument into parallel (``prange``) loops, whose kernels then hold the
function's address. The functions below are pynndescent 0.7's with the thread count passed in from
Python and the distance bound at compile time; the candidate processing keeps only the batched-kernel
path (the dot-product kernel this distance always has); the leaf updates run as plain loops (work is split
by the explicit thread count, so the result is the same; the job runs NN-descent on one thread anyway);
everything else they call is the library's.
``install`` puts the cached path in place of the library's function for the distance the job uses
(``alternative_dot``: cosine on unit rows) and leaves every other distance to the library. The graph is
the library's, bit for bit (``tests/test_clustering.py``).

Adapted from pynndescent (https://github.com/lmcinnes/pynndescent), BSD 2-Clause License,
Copyright (c) 2018, Leland McInnes."""
from __future__ import annotations

from typing import Any

import numba
import numpy as np
from pynndescent import distances as pynnd_dist
from pynndescent import pynndescent_ as lib
from pynndescent.kernels import generate_graph_update_array_batched
from pynndescent.utils import (apply_graph_update_array, apply_sorted_graph_update_array, build_candidates_owner,
                               checked_flagged_heap_push, deheap_sort, int32_bits_as_float32, make_heap,
                               sort_updates_by_block, tau_rand_int)

_library_nn_descent = lib.nn_descent
_dist = pynnd_dist.alternative_dot


@numba.njit(cache=True, fastmath=True)
def _generate_leaf_updates(updates, n_updates_per_thread, leaf_block, current_graph, data, n_threads):  # type: ignore[no-untyped-def]
    n_leaves = leaf_block.shape[0]
    leaves_per_thread = (n_leaves // n_threads) + 1
    heap_distances = current_graph[1]
    for t in range(n_threads):
        n_updates_per_thread[t] = 0
    for t in range(n_threads):
        start_leaf = t * leaves_per_thread
        end_leaf = min(start_leaf + leaves_per_thread, n_leaves)
        max_updates = updates.shape[1]
        count = 0
        for leaf_idx in range(start_leaf, end_leaf):
            for i in range(leaf_block.shape[1]):
                p = leaf_block[leaf_idx, i]
                if p < 0:
                    break
                for j in range(i + 1, leaf_block.shape[1]):
                    q = leaf_block[leaf_idx, j]
                    if q < 0:
                        break
                    d = _dist(data[p], data[q])
                    max_threshold = max(heap_distances[p, 0], heap_distances[q, 0])
                    if d < max_threshold:
                        if count < max_updates:
                            updates[t, count, 0] = int32_bits_as_float32(p)
                            updates[t, count, 1] = int32_bits_as_float32(q)
                            updates[t, count, 2] = d
                            count += 1
        n_updates_per_thread[t] = count
    return updates


@numba.njit(locals={"d": numba.float32, "p": numba.int32, "q": numba.int32}, cache=True, fastmath=True)
def _init_rp_tree(data, current_graph, leaf_array, n_threads):  # type: ignore[no-untyped-def]
    n_leaves = leaf_array.shape[0]
    block_size = n_threads * 64
    n_blocks = n_leaves // block_size
    max_leaf_size = leaf_array.shape[1]
    updates_per_thread = int(block_size * max_leaf_size * (max_leaf_size - 1) / (2 * n_threads)) + 1
    updates = np.zeros((n_threads, updates_per_thread, 3), dtype=np.float32)
    n_updates_per_thread = np.zeros(n_threads, dtype=np.int32)
    sorted_updates = np.empty((n_threads, 2 * updates_per_thread, 3), dtype=np.float32)
    block_offsets = np.zeros((n_threads, n_threads + 1), dtype=np.int64)
    n_vertices = current_graph[0].shape[0]
    for i in range(n_blocks + 1):
        block_start = i * block_size
        block_end = min(n_leaves, (i + 1) * block_size)
        leaf_block = leaf_array[block_start:block_end]
        _generate_leaf_updates(updates, n_updates_per_thread, leaf_block, current_graph, data, n_threads)
        sort_updates_by_block(updates, n_updates_per_thread, sorted_updates, block_offsets, n_vertices, n_threads)
        apply_sorted_graph_update_array(current_graph, sorted_updates, block_offsets, n_threads)


@numba.njit(cache=True)
def _process_candidates(data, current_graph, new_candidate_neighbors, old_candidate_neighbors, n_blocks,  # type: ignore[no-untyped-def]
                        block_size, n_threads, update_array, n_updates_per_thread, sorted_updates, block_offsets,
                        kernel):
    c = 0
    n_vertices = new_candidate_neighbors.shape[0]
    for i in range(n_blocks + 1):
        block_start = i * block_size
        block_end = min(n_vertices, (i + 1) * block_size)
        generate_graph_update_array_batched(update_array, n_updates_per_thread,
                                            new_candidate_neighbors[block_start:block_end],
                                            old_candidate_neighbors[block_start:block_end], current_graph, data,
                                            kernel, n_threads)
        if n_threads > 1:
            sort_updates_by_block(update_array, n_updates_per_thread, sorted_updates, block_offsets, n_vertices,
                                  n_threads)
            c += apply_sorted_graph_update_array(current_graph, sorted_updates, block_offsets, n_threads)
        else:
            c += apply_graph_update_array(current_graph, update_array, n_updates_per_thread, n_threads)
    return c


@numba.njit(cache=True)
def _nn_descent_internal(current_graph, data, n_neighbors, rng_state, max_candidates, n_iters, delta,  # type: ignore[no-untyped-def]
                         kernel, n_threads):
    n_vertices = data.shape[0]
    block_size = 16384
    n_blocks = n_vertices // block_size
    max_updates_per_thread = (int((max_candidates**2 + max_candidates * (max_candidates - 1) / 2) * block_size
                                  / n_threads) + 1024)
    update_array = np.empty((n_threads, max_updates_per_thread, 3), dtype=np.float32)
    n_updates_per_thread = np.zeros(n_threads, dtype=np.int32)
    if n_threads > 1:
        sorted_updates = np.empty((n_threads, 2 * max_updates_per_thread, 3), dtype=np.float32)
    else:
        sorted_updates = np.empty((1, 1, 3), dtype=np.float32)
    block_offsets = np.zeros((n_threads, n_threads + 1), dtype=np.int64)
    new_candidate_indices = np.full((n_vertices, max_candidates), -1, dtype=np.int32)
    new_candidate_priority = np.full((n_vertices, max_candidates), np.inf, dtype=np.float32)
    old_candidate_indices = np.full((n_vertices, max_candidates), -1, dtype=np.int32)
    old_candidate_priority = np.full((n_vertices, max_candidates), np.inf, dtype=np.float32)
    active = np.ones(n_vertices, dtype=np.uint8)
    reverse_dst = np.empty(n_vertices * n_neighbors, dtype=np.int32)
    reverse_src = np.empty(n_vertices * n_neighbors, dtype=np.int32)
    bucket_bounds = np.zeros((n_threads, n_threads + 1), dtype=np.int64)
    for _ in range(n_iters):
        new_candidate_neighbors, old_candidate_neighbors = build_candidates_owner(
            current_graph, max_candidates, rng_state, n_threads, new_candidate_indices, new_candidate_priority,
            old_candidate_indices, old_candidate_priority, active, reverse_dst, reverse_src, bucket_bounds)
        c = _process_candidates(data, current_graph, new_candidate_neighbors, old_candidate_neighbors, n_blocks,
                                block_size, n_threads, update_array, n_updates_per_thread, sorted_updates,
                                block_offsets, kernel)
        if c <= delta * n_neighbors * data.shape[0]:
            return


@numba.njit(fastmath=True, locals={"d": numba.float32, "idx": numba.int32, "i": numba.int32}, cache=True)
def _init_random(n_neighbors, data, heap, rng_state):  # type: ignore[no-untyped-def]
    for i in range(data.shape[0]):
        if heap[0][i, 0] < 0.0:
            for j in range(n_neighbors - np.sum(heap[0][i] >= 0.0)):
                idx = np.abs(tau_rand_int(rng_state)) % data.shape[0]
                if data.shape[0] > 1:
                    while idx == i:
                        idx = np.abs(tau_rand_int(rng_state)) % data.shape[0]
                d = _dist(data[idx], data[i])
                checked_flagged_heap_push(heap[1][i], heap[0][i], heap[2][i], d, idx, np.uint8(1))


@numba.njit(cache=True)
def _nn_descent_dot(data, n_neighbors, rng_state, max_candidates, n_iters, delta, leaf_array, kernel,  # type: ignore[no-untyped-def]
                    n_threads):
    current_graph = make_heap(data.shape[0], n_neighbors)
    _init_rp_tree(data, current_graph, leaf_array, n_threads)
    _init_random(n_neighbors, data, current_graph, rng_state)
    _nn_descent_internal(current_graph, data, n_neighbors, rng_state, max_candidates, n_iters, delta, kernel,
                         n_threads)
    return deheap_sort(current_graph[0], current_graph[1])


def nn_descent(data: Any, n_neighbors: int, rng_state: Any, max_candidates: int = 50,
               dist: Any = pynnd_dist.euclidean, n_iters: int = 10, delta: float = 0.001,
               init_graph: Any = lib.EMPTY_GRAPH, rp_tree_init: bool = True, leaf_array: Any = None,
               low_memory: bool = True, verbose: bool = False, kernel: int = 0) -> Any:
    """``pynndescent.pynndescent_.nn_descent``'s signature: the cached path where it applies, else the library."""
    if (dist is _dist and kernel != 0 and init_graph[0].shape[0] == 1 and rp_tree_init and leaf_array is not None
            and not verbose):
        return _nn_descent_dot(data, n_neighbors, rng_state, max_candidates, n_iters, delta, leaf_array, kernel,
                               numba.get_num_threads())
    return _library_nn_descent(data, n_neighbors, rng_state, max_candidates, dist, n_iters, delta, init_graph,
                               rp_tree_init, leaf_array, low_memory, verbose, kernel)


def install() -> None:
    """Route pynndescent's NN-descent through the cached path (the NNDescent class calls it by name)."""
    if lib.nn_descent is not nn_descent:
        lib.nn_descent = nn_descent
