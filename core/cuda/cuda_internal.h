/* cuda_internal.h — the CUDA backend's entry points, as seen by the C files in core/.
 *
 * What it is: one declaration per nr_cuda_ function that the core C files call, either through
 * NR_ON_CUDA(t, nr_cuda_X(args)) (same parameter list as the public nr_X in core/nr.h) or
 * directly (allocation, element access, copies). Plain C declarations, wrapped in extern "C" so
 * the .cu files that define them get C linkage.
 * What it is not: the helpers shared inside core/cuda/ (cuda_common.h) or the runtime functions
 * Lua calls (core/nr.h, section cuda).
 * Invariants: every nr_cuda_X works on tensors that live on one GPU (the tensors' device_index)
 * and enqueues its work on that device's compute stream; it synchronises only when a value must
 * be read on the host (nr_cuda_get, device-to-host copies, the loss, the live count).
 */
#ifndef NR_CUDA_INTERNAL_H
#define NR_CUDA_INTERNAL_H

#include "../nr.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- runtime (runtime.c) */
/* Device memory from the caching allocator; NULL with the error set on failure. */
void *nr_cuda_alloc(int32_t device_index, int64_t bytes);
/* Returns a block to the cache; bytes must be the value passed to nr_cuda_alloc. */
void nr_cuda_free(int32_t device_index, void *ptr, int64_t bytes);
/* Hands one GPU's cached blocks back to the driver (nr_cuda_empty_cache does every GPU's). */
void nr_cuda_empty_cache_of(int32_t device_index);
/* The calling thread's current GPU (new tensors go there). */
int32_t nr_cuda_current_device(void);
/* Element at offset off (elements, from t->data) read / written as a double; get synchronises. */
nr_status nr_cuda_get(const nr_tensor *t, int64_t off, double *value);
nr_status nr_cuda_set(nr_tensor *t, int64_t off, double value);
/* dst <- src, equal numel/shape (checked by the caller); at least one of them on a GPU. */
nr_status nr_cuda_copy(nr_tensor *dst, const nr_tensor *src);
nr_status nr_cuda_fill(nr_tensor *t, double value);

/* ---- tensor math (tensor_kernels.cu, blas.c) */
nr_status nr_cuda_binary(const nr_tensor *a, const nr_tensor *b, nr_tensor *out, int32_t op);
nr_status nr_cuda_binary_scalar(const nr_tensor *a, double s, nr_tensor *out, int32_t op);
nr_status nr_cuda_unary(const nr_tensor *a, nr_tensor *out, int32_t op);
nr_status nr_cuda_axpy(const nr_tensor *x, nr_tensor *y, double alpha);
nr_status nr_cuda_reduce(const nr_tensor *a, int32_t dim, nr_tensor *out, int32_t op);
nr_status nr_cuda_argmax(const nr_tensor *a, int32_t dim, nr_tensor *out);
nr_status nr_cuda_matmul(const nr_tensor *a, const nr_tensor *b, nr_tensor *out, int32_t trans_a,
                         int32_t trans_b, float alpha, float beta);
/* index (K) int64 on the same GPU; contiguous operands (checked by the caller). */
nr_status nr_cuda_index_select(const nr_tensor *src, int32_t dim, const nr_tensor *index,
                               nr_tensor *out);
nr_status nr_cuda_index_copy(nr_tensor *dst, int32_t dim, const nr_tensor *index,
                             const nr_tensor *src);

/* ---- layers (conv.c: cuDNN; nn_kernels.cu: own kernels) */
nr_status nr_cuda_conv2d_forward(const nr_tensor *x, nr_tensor *y, const nr_tensor *w,
                                 const nr_tensor *b, int32_t stride_h, int32_t stride_w,
                                 int32_t pad_h, int32_t pad_w, int32_t dil_h, int32_t dil_w,
                                 int32_t groups);
nr_status nr_cuda_conv2d_backward_data(const nr_tensor *dy, nr_tensor *dx, const nr_tensor *w,
                                       int32_t stride_h, int32_t stride_w, int32_t pad_h,
                                       int32_t pad_w, int32_t dil_h, int32_t dil_w, int32_t groups);
nr_status nr_cuda_conv2d_backward_weight(const nr_tensor *x, const nr_tensor *dy, nr_tensor *dw,
                                         nr_tensor *db, int32_t stride_h, int32_t stride_w,
                                         int32_t pad_h, int32_t pad_w, int32_t dil_h,
                                         int32_t dil_w, int32_t groups, float scale, float acc);
nr_status nr_cuda_bn2d_forward_train(const nr_tensor *x, nr_tensor *y, nr_tensor *save_mean,
                                     nr_tensor *save_invstd, const nr_tensor *gamma,
                                     const nr_tensor *beta, nr_tensor *running_mean,
                                     nr_tensor *running_var, float momentum, float eps, int32_t relu);
nr_status nr_cuda_bn2d_forward_eval(const nr_tensor *x, nr_tensor *y, const nr_tensor *gamma,
                                    const nr_tensor *beta, const nr_tensor *running_mean,
                                    const nr_tensor *running_var, float eps, int32_t relu);
nr_status nr_cuda_bn2d_backward(const nr_tensor *x, const nr_tensor *dy, nr_tensor *dx,
                                nr_tensor *dgamma, nr_tensor *dbeta, const nr_tensor *gamma,
                                const nr_tensor *save_mean, const nr_tensor *save_invstd,
                                float scale, float acc, const nr_tensor *relu_y);
nr_status nr_cuda_bn2d_backward_eval(const nr_tensor *x, const nr_tensor *dy, nr_tensor *dx,
                                     nr_tensor *dgamma, nr_tensor *dbeta, const nr_tensor *gamma,
                                     const nr_tensor *running_mean, const nr_tensor *running_var,
                                     float eps, float scale, float acc, const nr_tensor *relu_y);
nr_status nr_cuda_relu_forward(const nr_tensor *x, nr_tensor *y);
nr_status nr_cuda_relu_backward(const nr_tensor *y, const nr_tensor *dy, nr_tensor *dx);
nr_status nr_cuda_sigmoid_forward(const nr_tensor *x, nr_tensor *y);
nr_status nr_cuda_sigmoid_backward(const nr_tensor *y, const nr_tensor *dy, nr_tensor *dx);
nr_status nr_cuda_activation_forward(const nr_tensor *x, nr_tensor *y, int32_t kind, float alpha);
nr_status nr_cuda_activation_backward(const nr_tensor *saved, const nr_tensor *dy, nr_tensor *dx, int32_t kind, float alpha);
nr_status nr_cuda_softmax_forward(const nr_tensor *x, nr_tensor *y, int32_t log_softmax);
nr_status nr_cuda_softmax_backward(const nr_tensor *y, const nr_tensor *dy, nr_tensor *dx, int32_t log_softmax);
/* pooling: the output size comes from y (dy), checked by the CPU entry point (ceil_mode included) */
nr_status nr_cuda_maxpool2d_forward(const nr_tensor *x, nr_tensor *y, nr_tensor *indices,
                                    int32_t kernel_h, int32_t kernel_w, int32_t stride_h,
                                    int32_t stride_w, int32_t pad_h, int32_t pad_w, int32_t ceil_mode);
nr_status nr_cuda_maxpool2d_backward(const nr_tensor *dy, const nr_tensor *indices, nr_tensor *dx,
                                     int32_t kernel_h, int32_t kernel_w, int32_t stride_h, int32_t stride_w,
                                     int32_t pad_h, int32_t pad_w, int32_t ceil_mode);
nr_status nr_cuda_avgpool2d_forward(const nr_tensor *x, nr_tensor *y, int32_t kernel_h,
                                    int32_t kernel_w, int32_t stride_h, int32_t stride_w,
                                    int32_t pad_h, int32_t pad_w, int32_t count_include_pad, int32_t ceil_mode);
nr_status nr_cuda_avgpool2d_backward(const nr_tensor *dy, nr_tensor *dx, int32_t kernel_h,
                                     int32_t kernel_w, int32_t stride_h, int32_t stride_w,
                                     int32_t pad_h, int32_t pad_w, int32_t count_include_pad, int32_t ceil_mode);
nr_status nr_cuda_adaptive_maxpool2d_forward(const nr_tensor *x, nr_tensor *y, nr_tensor *indices);
nr_status nr_cuda_adaptive_maxpool2d_backward(const nr_tensor *dy, const nr_tensor *indices, nr_tensor *dx);
nr_status nr_cuda_adaptive_avgpool2d_forward(const nr_tensor *x, nr_tensor *y);
nr_status nr_cuda_adaptive_avgpool2d_backward(const nr_tensor *dy, nr_tensor *dx);
nr_status nr_cuda_global_avgpool_forward(const nr_tensor *x, nr_tensor *y);
nr_status nr_cuda_global_avgpool_backward(const nr_tensor *dy, nr_tensor *dx);
nr_status nr_cuda_bias_add(nr_tensor *y, const nr_tensor *b);
nr_status nr_cuda_bias_backward(const nr_tensor *dy, nr_tensor *db, float scale, float acc);
nr_status nr_cuda_dropout_forward(const nr_tensor *x, nr_tensor *y, nr_tensor *mask, float p);
nr_status nr_cuda_dropout_backward(const nr_tensor *dy, const nr_tensor *mask, nr_tensor *dx);
/* Reads one flag back (synchronises the stream); errors are reported as func's. */
nr_status nr_cuda_check_class_ids(const char *func, const nr_tensor *labels, int64_t num_classes);
nr_status nr_cuda_softmax_xent_forward(const nr_tensor *logits, const nr_tensor *labels,
                                       nr_tensor *loss, nr_tensor *probs, float label_smoothing);
nr_status nr_cuda_softmax_xent_backward(const nr_tensor *probs, const nr_tensor *labels,
                                        nr_tensor *dlogits, float label_smoothing, float scale);
nr_status nr_cuda_batch_metrics_add(const nr_tensor *logits, const nr_tensor *labels, const nr_tensor *loss,
                                    nr_tensor *acc);

/* ---- data (tensor_kernels.cu): checked by core/data_augment.c; scale, bias: C values */
nr_status nr_cuda_images_normalize(const nr_tensor *src, const float *scale, const float *bias, nr_tensor *dst);

/* ---- optimizers (nn_kernels.cu): arguments checked by core/optim.c before dispatch */
nr_status nr_cuda_sgd_step(nr_tensor *param, const nr_tensor *grad, nr_tensor *momentum_buf,
                           float lr, float momentum, float weight_decay, int32_t nesterov);
nr_status nr_cuda_sgd_step_many(const nr_sgd_job *jobs, int64_t n, float lr, float momentum, float weight_decay,
                                int32_t nesterov);
nr_status nr_cuda_adam_step_many(const nr_adam_job *jobs, int64_t n, double lr, double beta1, double beta2, double eps,
                                 double weight_decay, int32_t decoupled);
nr_status nr_cuda_clip_grad_norm(nr_tensor *const *grads, int64_t n, nr_tensor *total, double max_norm,
                                 int32_t norm_type);
/* ---- NR primitives (nn_kernels.cu); these check every argument themselves, because their CPU
 * entry points dispatch before checking. */
nr_status nr_cuda_bn_live_mask(const nr_tensor *gamma, nr_tensor *mask, float threshold_rel,
                               float abs_min, int64_t *live);
nr_status nr_cuda_l1_sign_add(const nr_tensor *gamma, nr_tensor *grad, float lambda);
/* Checked by the CPU entry points (core/nr_ops.c) before dispatch. */
nr_status nr_cuda_cross_attention_forward(const nr_tensor *a, const nr_tensor *b, nr_tensor *out, nr_tensor *gate);
nr_status nr_cuda_cross_attention_backward(const nr_tensor *gate, const nr_tensor *b, const nr_tensor *g, nr_tensor *da,
                                           nr_tensor *db);
/* nr_surgery.cu; checks with nr_place_plan_build (core/nr_ops.c, core/cuda/nr_place.h). */
nr_status nr_cuda_surgery_place(nr_tensor *dst, float fill, const nr_tensor *a, const nr_tensor *a_rows,
                                const nr_tensor *a_cols, const nr_tensor *b, const nr_tensor *b_rows,
                                const nr_tensor *b_cols, float b_std, uint64_t b_seed);
nr_status nr_cuda_surgery_place_many(const nr_place_job *jobs, int64_t n);

#ifdef __cplusplus
}
#endif
#endif
