/* data_dataset.c — the nr_dataset handle: reference counting, accessors, per-sample views, and
 * the image-folder scan (root/<class>/... PNG and JPEG files, ImageNet layout).
 *
 * Invariants: a dataset is immutable after open, so worker threads read it without locks; it is
 * freed when the last reference (the opener's or a loader's) is dropped. Image-folder classes are
 * the subfolders in byte order (Python's sorted() on UTF-8 names); within a class, folders are
 * visited sorted by path and files sorted by name (torchvision's sorted(os.walk(...)) order,
 * symlinks followed); an empty class folder is an error at open, as in torchvision. Opened with
 * a given class list (another split's, as torchvision's shared class_to_idx), class ids are
 * positions in that list, every class folder must be in it (an error names the one that is
 * not), and classes of the list without a folder simply have no samples.
 */
#include "data_internal.h"

#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>

nr_dataset *nr_dataset_alloc(void)
{
   nr_dataset *ds = calloc(1, sizeof *ds);
   if (!ds) {
      NR_FAIL(NR_E_OOM, "out of memory");
      return NULL;
   }
   atomic_init(&ds->refs, 1);
   return ds;
}

void nr_dataset_retain(nr_dataset *ds) { atomic_fetch_add(&ds->refs, 1); }

void nr_dataset_free(nr_dataset *ds)
{
   if (!ds || atomic_fetch_sub(&ds->refs, 1) != 1) return;
   free(ds->labels);
   free(ds->pixels);
   free(ds->paths);
   free(ds->path_off);
   free(ds->names);
   free(ds->name_off);
   free(ds);
}

int64_t nr_dataset_size(const nr_dataset *ds) { return ds ? ds->n : 0; }
int32_t nr_dataset_classes(const nr_dataset *ds) { return ds ? ds->classes : 0; }
int32_t nr_dataset_channels(const nr_dataset *ds) { return ds ? ds->channels : 0; }
int32_t nr_dataset_height(const nr_dataset *ds) { return ds ? ds->height : 0; }
int32_t nr_dataset_width(const nr_dataset *ds) { return ds ? ds->width : 0; }

const char *nr_dataset_class_name(const nr_dataset *ds, int32_t k)
{
   if (!ds || !ds->names || k < 0 || k >= ds->classes) return NULL;
   return ds->names + ds->name_off[k];
}

const char *nr_dataset_path(const nr_dataset *ds, int64_t i)
{
   if (!ds || !ds->paths || i < 0 || i >= ds->n) return NULL;
   return ds->paths + ds->path_off[i];
}

int64_t nr_dataset_label(const nr_dataset *ds, int64_t i)
{
   if (!ds || i < 0 || i >= ds->n) return -1;
   return ds->labels[i];
}

nr_status nr_dataset_sample(const nr_dataset *ds, int64_t i, nr_decoder *d, nr_img *out)
{
   if (i < 0 || i >= ds->n) return NR_FAIL(NR_E_ARG, "sample %lld outside 0..%lld", (long long)i, (long long)ds->n - 1);
   if (ds->kind == NR_DS_FILES) return nr_image_decode_file(d, ds->paths + ds->path_off[i], 3, out);
   out->p = ds->pixels + i * ds->sample_bytes;
   out->h = ds->height;
   out->w = ds->width;
   out->c = ds->channels;
   out->sy = ds->sy;
   out->sx = ds->sx;
   out->sc = ds->sc;
   out->full_h = out->full_w = 0;
   return NR_OK;
}

nr_tensor *nr_dataset_image(const nr_dataset *ds, int64_t i)
{
   if (!ds) {
      NR_FAIL(NR_E_ARG, "dataset is NULL");
      return NULL;
   }
   nr_decoder dec = {0};
   nr_img im;
   nr_tensor *t = NULL;
   if (nr_dataset_sample(ds, i, &dec, &im) == NR_OK) {
      int64_t shape[3] = {im.c, im.h, im.w};
      t = nr_tensor_new(NR_U8, NR_CPU, 3, shape);
      if (t) {
         uint8_t *o = t->data;
         for (int c = 0; c < im.c; c++)
            for (int y = 0; y < im.h; y++)
               for (int x = 0; x < im.w; x++) *o++ = im.p[y * im.sy + x * im.sx + c * im.sc];
      }
   }
   nr_decoder_release(&dec);
   return t;
}

/* ---- image folders ------------------------------------------------------------------------ */

typedef struct strlist {
   char **v;
   int64_t n, cap;
} strlist;

static nr_status strlist_push(strlist *l, const char *s)
{
   if (l->n == l->cap) {
      int64_t cap = l->cap ? l->cap * 2 : 64;
      char **v = realloc(l->v, (size_t)cap * sizeof *v);
      if (!v) return NR_FAIL(NR_E_OOM, "out of memory listing files");
      l->v = v;
      l->cap = cap;
   }
   l->v[l->n] = strdup(s);
   if (!l->v[l->n]) return NR_FAIL(NR_E_OOM, "out of memory listing files");
   l->n++;
   return NR_OK;
}

static void strlist_free(strlist *l)
{
   for (int64_t i = 0; i < l->n; i++) free(l->v[i]);
   free(l->v);
   memset(l, 0, sizeof *l);
}

static int cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

static int is_image_name(const char *name)
{
   const char *dot = strrchr(name, '.');
   if (!dot) return 0;
   return !strcasecmp(dot, ".png") || !strcasecmp(dot, ".jpg") || !strcasecmp(dot, ".jpeg");
}

static int is_dir(const char *path)
{
   struct stat st;
   return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

/* Whether entry e of folder dir is a folder (following symlinks, as torchvision does). */
static int entry_is_dir(const char *dir, const struct dirent *e)
{
#ifdef _DIRENT_HAVE_D_TYPE
   if (e->d_type == DT_DIR) return 1;
   if (e->d_type == DT_REG) return 0;
#endif
   char path[4096];
   snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
   return is_dir(path);
}

/* Appends dir and every folder below it to dirs. */
static nr_status list_dirs(const char *dir, strlist *dirs, int depth)
{
   if (depth > 32) return NR_FAIL(NR_E_FORMAT, "%s: folders nested too deeply (symlink loop?)", dir);
   NR_TRY(strlist_push(dirs, dir));
   DIR *d = opendir(dir);
   if (!d) return NR_FAIL(NR_E_IO, "cannot open folder %s: %s", dir, strerror(errno));
   nr_status st = NR_OK;
   struct dirent *e;
   char path[4096];
   while (!st && (e = readdir(d)) != NULL) {
      if (e->d_name[0] == '.' || !entry_is_dir(dir, e)) continue;
      snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
      st = list_dirs(path, dirs, depth + 1);
   }
   closedir(d);
   return st;
}

/* Appends the image files of dir (not of its subfolders), sorted by name, to out. */
static nr_status list_files(const char *dir, strlist *out)
{
   DIR *d = opendir(dir);
   if (!d) return NR_FAIL(NR_E_IO, "cannot open folder %s: %s", dir, strerror(errno));
   strlist names = {0};
   nr_status st = NR_OK;
   struct dirent *e;
   while (!st && (e = readdir(d)) != NULL) {
      if (e->d_name[0] == '.' || !is_image_name(e->d_name) || entry_is_dir(dir, e)) continue;
      st = strlist_push(&names, e->d_name);
   }
   closedir(d);
   if (!st && names.n > 1) qsort(names.v, (size_t)names.n, sizeof *names.v, cmp_str);
   char path[4096];
   for (int64_t i = 0; !st && i < names.n; i++) {
      snprintf(path, sizeof path, "%s/%s", dir, names.v[i]);
      st = strlist_push(out, path);
   }
   strlist_free(&names);
   return st;
}

/* Appends the image files under dir in torchvision's order: folders sorted by path (as
 * sorted(os.walk(dir))), files sorted by name within each. */
static nr_status walk_images(const char *dir, strlist *out)
{
   strlist dirs = {0};
   nr_status st = list_dirs(dir, &dirs, 0);
   if (!st && dirs.n > 1) qsort(dirs.v, (size_t)dirs.n, sizeof *dirs.v, cmp_str);
   for (int64_t i = 0; !st && i < dirs.n; i++) st = list_files(dirs.v[i], out);
   strlist_free(&dirs);
   return st;
}

/* Position of name in the list classes (nclasses entries), or -1. */
static int32_t find_class(const char *const *classes, int32_t nclasses, const char *name)
{
   for (int32_t k = 0; k < nclasses; k++)
      if (!strcmp(classes[k], name)) return k;
   return -1;
}

/* "a, b, c" (at most 8 names, then ", ... (N in all)") into buf. */
static void class_list(const char *const *classes, int32_t nclasses, char *buf, size_t cap)
{
   size_t off = 0;
   buf[0] = 0;
   for (int32_t k = 0; k < nclasses && k < 8 && off < cap; k++)
      off += (size_t)snprintf(buf + off, cap - off, "%s%s", k ? ", " : "", classes[k]);
   if (nclasses > 8 && off < cap) snprintf(buf + off, cap - off, ", ... (%d in all)", nclasses);
}

nr_dataset *nr_dataset_open_imagefolder(const char *root)
{
   return nr_dataset_open_imagefolder_classes(root, NULL, 0);
}

nr_dataset *nr_dataset_open_imagefolder_classes(const char *root, const char *const *given, int32_t ngiven)
{
   if (!root || !*root) {
      NR_FAIL(NR_E_ARG, "root is empty");
      return NULL;
   }
   if (given) {
      if (ngiven < 1) {
         NR_FAIL(NR_E_ARG, "the given class list is empty");
         return NULL;
      }
      for (int32_t k = 0; k < ngiven; k++) {
         if (!given[k] || !*given[k]) {
            NR_FAIL(NR_E_ARG, "given class %d is empty", k);
            return NULL;
         }
         if (find_class(given, k, given[k]) >= 0) {
            NR_FAIL(NR_E_ARG, "given class %s appears twice in the class list", given[k]);
            return NULL;
         }
      }
   }
   if (!is_dir(root)) {
      NR_FAIL(NR_E_IO, "image folder %s does not exist or is not a folder (expected root/<split>/<class>/*.jpg|png, "
              "one subfolder per class)", root);
      return NULL;
   }
   strlist classes = {0}, files = {0};
   nr_dataset *ds = NULL;
   int32_t *labels = NULL;
   int64_t nlab = 0, labcap = 0;
   DIR *d = opendir(root);
   if (!d) {
      NR_FAIL(NR_E_IO, "cannot open folder %s: %s", root, strerror(errno));
      return NULL;
   }
   struct dirent *e;
   char path[4096];
   nr_status st = NR_OK;
   while (!st && (e = readdir(d)) != NULL) {
      if (e->d_name[0] == '.') continue;
      snprintf(path, sizeof path, "%s/%s", root, e->d_name);
      if (is_dir(path)) st = strlist_push(&classes, e->d_name);
   }
   closedir(d);
   if (st) goto fail;
   if (classes.n == 0) {
      NR_FAIL(NR_E_FORMAT, "image folder %s has no class subfolders (expected %s/<class>/*.jpg|png, one "
              "subfolder per class)", root, root);
      goto fail;
   }
   qsort(classes.v, (size_t)classes.n, sizeof *classes.v, cmp_str);
   for (int64_t k = 0; k < classes.n; k++) {
      int64_t before = files.n;
      int32_t id = (int32_t)k;
      snprintf(path, sizeof path, "%s/%s", root, classes.v[k]);
      if (given && (id = find_class(given, ngiven, classes.v[k])) < 0) {
         char names[512];
         class_list(given, ngiven, names, sizeof names);
         NR_FAIL(NR_E_FORMAT, "class folder %s (class %s) is not one of the %d given classes (%s); a validation "
                 "or test split must use the training split's classes", path, classes.v[k], ngiven, names);
         goto fail;
      }
      if (walk_images(path, &files)) goto fail;
      if (files.n == before) {
         NR_FAIL(NR_E_FORMAT, "class folder %s has no .png/.jpg/.jpeg images (every class folder of the image "
                 "folder needs at least one)", path);
         goto fail;
      }
      if (files.n > labcap) {
         labcap = files.n * 2;
         int32_t *nl = realloc(labels, (size_t)labcap * sizeof *nl);
         if (!nl) {
            NR_FAIL(NR_E_OOM, "out of memory");
            goto fail;
         }
         labels = nl;
      }
      for (; nlab < files.n; nlab++) labels[nlab] = id;
   }
   ds = nr_dataset_alloc();
   if (!ds) goto fail;
   ds->kind = NR_DS_FILES;
   ds->n = files.n;
   ds->classes = given ? ngiven : (int32_t)classes.n;
   ds->channels = 3;
   ds->labels = labels;
   labels = NULL;
   snprintf(ds->root, sizeof ds->root, "%s", root);
   const char *const *cnames = given ? given : (const char *const *)classes.v;
   size_t pbytes = 0, nbytes = 0;
   for (int64_t i = 0; i < files.n; i++) pbytes += strlen(files.v[i]) + 1;
   for (int64_t i = 0; i < ds->classes; i++) nbytes += strlen(cnames[i]) + 1;
   ds->paths = malloc(pbytes);
   ds->path_off = malloc((size_t)files.n * sizeof(int64_t));
   ds->names = malloc(nbytes);
   ds->name_off = malloc((size_t)ds->classes * sizeof(int64_t));
   if (!ds->paths || !ds->path_off || !ds->names || !ds->name_off) {
      NR_FAIL(NR_E_OOM, "out of memory");
      goto fail;
   }
   size_t off = 0;
   for (int64_t i = 0; i < files.n; i++) {
      ds->path_off[i] = (int64_t)off;
      size_t len = strlen(files.v[i]) + 1;
      memcpy(ds->paths + off, files.v[i], len);
      off += len;
   }
   off = 0;
   for (int64_t i = 0; i < ds->classes; i++) {
      ds->name_off[i] = (int64_t)off;
      size_t len = strlen(cnames[i]) + 1;
      memcpy(ds->names + off, cnames[i], len);
      off += len;
   }
   strlist_free(&classes);
   strlist_free(&files);
   return ds;
fail:
   free(labels);
   strlist_free(&classes);
   strlist_free(&files);
   nr_dataset_free(ds);
   return NULL;
}
