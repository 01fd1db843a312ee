/* nrlua.c — the nrlua executable: LuaJIT embedded, package paths set, files, -e, and a REPL.
 *
 *   nrlua FILE.lua [args...]   run a file (script args in `arg`); a file that returns a table
 *                              is a recipe and is run with nr.recipe.run(table, args); FILE "-"
 *                              is standard input; -i before FILE: the REPL after it
 *   nrlua -e CODE              run a chunk
 *   nrlua [-i]                 interactive REPL (readline history, multi-line, completion);
 *                              statements are read from stdin when it is not a terminal
 *   nrlua -v | --version, -h | --help
 *
 * Paths: the nrlua home (the folder holding lua/nr and models/) is $NRLUA_HOME, else found
 * relative to this executable (build tree: <exe>/..; install: <exe>/../share/nrlua), else the
 * source folder this binary was built from. libnr is looked up beside the executable, then in
 * <exe>/../lib. The home and library paths are published to Lua as the global table _NRLUA.
 * The Lua API symbols are exported (-rdynamic) so C modules such as cjson.so load. */
#include <errno.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <lauxlib.h>
#include <lua.h>
#include <luajit.h>
#include <lualib.h>
#include <readline/history.h>
#include <readline/readline.h>

#ifndef NR_SOURCE_DIR
#define NR_SOURCE_DIR "."
#endif
#ifndef NR_VERSION
#define NR_VERSION "0.1.0"
#endif

static lua_State *L_global;

/* ---- SIGINT and SIGTERM, as the standard lua.c does SIGINT -----------------------------
 * While Lua code runs (docall), SIGINT sets a hook that raises "interrupted" at the next Lua
 * instruction; the handler resets itself to the default action, so a second SIGINT while the
 * first is pending (a long C call, or a loop in JIT-compiled code, which does not check hooks)
 * ends the process. A script or recipe then exits with status 130; the REPL cancels the input.
 * SIGTERM (what a batch scheduler or `kill` sends) is taken the same way, so a run says where it
 * stopped and how to resume it, then dies by the signal (status 143 in a shell). Either one
 * ignored when nrlua started stays ignored. interrupted: the signal's number, or 0. */
static volatile sig_atomic_t interrupted;
static int sigint_ignored; /* SIGINT ignored when started (a background job of a script): kept so */
static int sigterm_ignored; /* likewise SIGTERM (nohup-like launchers): kept so */

static void interrupt_hook(lua_State *L, lua_Debug *ar)
{
   (void)ar;
   lua_sethook(L, NULL, 0, 0);
   lua_pushstring(L, "interrupted"); /* no position: shown without a traceback */
   lua_error(L);
}

static void on_sigint(int sig)
{
   signal(sig, SIG_DFL); /* a second Ctrl-C kills */
   interrupted = sig;
   lua_sethook(L_global, interrupt_hook, LUA_MASKCALL | LUA_MASKRET | LUA_MASKCOUNT, 1);
}

/* Ends the process as SIGTERM would have (a parent sees the signal, not an exit status). */
static void die_by_sigterm(void)
{
   fflush(NULL);
   signal(SIGTERM, SIG_DFL);
   raise(SIGTERM);
   exit(128 + SIGTERM); /* (not reached) */
}

/* In the REPL a SIGINT cancels the statement; a SIGTERM, once the statement has unwound, ends
 * the process as the signal would have. */
static void exit_if_terminated(lua_State *L)
{
   if (interrupted != SIGTERM) return;
   lua_close(L);
   die_by_sigterm();
}

static int file_exists(const char *p) { return access(p, R_OK) == 0; }

static void exe_dir(char *out, size_t n)
{
   char buf[PATH_MAX];
   ssize_t k = readlink("/proc/self/exe", buf, sizeof buf - 1);
   if (k <= 0) {
      snprintf(out, n, ".");
      return;
   }
   buf[k] = 0;
   char *slash = strrchr(buf, '/');
   if (slash) *slash = 0;
   snprintf(out, n, "%s", buf);
}

/* Finds the nrlua home and the libnr path; returns 0 when the home is found. */
static int locate(char *home, char *lib, size_t n)
{
   char dir[PATH_MAX], probe[PATH_MAX + 64];
   exe_dir(dir, sizeof dir);
   const char *env = getenv("NRLUA_HOME");
   const char *candidates[4];
   char c1[PATH_MAX + 32], c2[PATH_MAX + 32];
   int k = 0;
   if (env && *env) {
      /* the home asked for, or an error: another tree standing in for it would go unnoticed */
      snprintf(probe, sizeof probe, "%s/lua/nr/init.lua", env);
      if (!file_exists(probe)) {
         fprintf(stderr, "nrlua: NRLUA_HOME=%s has no lua/nr/init.lua\n", env);
         return -2;
      }
      candidates[k++] = env;
   }
   snprintf(c1, sizeof c1, "%s/..", dir);
   snprintf(c2, sizeof c2, "%s/../share/nrlua", dir);
   candidates[k++] = c1;
   candidates[k++] = c2;
   candidates[k++] = NR_SOURCE_DIR;
   home[0] = 0;
   for (int i = 0; i < k; i++) {
      snprintf(probe, sizeof probe, "%s/lua/nr/init.lua", candidates[i]);
      if (file_exists(probe)) {
         if (!realpath(candidates[i], home)) snprintf(home, n, "%s", candidates[i]);
         break;
      }
   }
   const char *envlib = getenv("NRLUA_LIB");
   if (envlib && *envlib) snprintf(lib, n, "%s", envlib);
   else {
      snprintf(probe, sizeof probe, "%s/libnr.so", dir);
      if (!file_exists(probe)) snprintf(probe, sizeof probe, "%s/../lib/libnr.so", dir);
      if (!file_exists(probe)) snprintf(probe, sizeof probe, "libnr.so");
      snprintf(lib, n, "%s", probe);
   }
   return home[0] ? 0 : -1;
}

/* The model zoo's files, "@<home>/models/" as their chunk names start (set by setup_paths). */
static char g_zoo_chunk[PATH_MAX + 16];

static void setup_paths(lua_State *L, const char *home, const char *lib)
{
   lua_getglobal(L, "package");
   lua_getfield(L, -1, "path");
   lua_pushfstring(L, "%s/lua/?.lua;%s/lua/?/init.lua;%s/?.lua;%s", home, home, home, lua_tostring(L, -1));
   lua_setfield(L, -3, "path");
   lua_pop(L, 2);
   lua_newtable(L);
   lua_pushstring(L, home);
   lua_setfield(L, -2, "home");
   snprintf(g_zoo_chunk, sizeof g_zoo_chunk, "@%s/models/", home);
   lua_pushstring(L, lib);
   lua_setfield(L, -2, "lib");
   lua_pushstring(L, NR_VERSION);
   lua_setfield(L, -2, "version");
   lua_setglobal(L, "_NRLUA");
}

/* The text after msg's leading "chunk:line:" position (and one space), as errors raised at a
 * code location start; NULL without one. *file_end: where the chunk name ends. */
static const char *after_position(const char *msg, const char **file_end)
{
   const char *c = strchr(msg, ':');
   if (!c || c == msg || memchr(msg, '\n', (size_t)(c - msg))) return NULL;
   const char *d = c + 1;
   while (*d >= '0' && *d <= '9') d++;
   if (d == c + 1 || *d != ':') return NULL;
   if (file_end) *file_end = c;
   return d[1] == ' ' ? d + 2 : d + 1;
}

static int has_position(const char *msg) { return after_position(msg, NULL) != NULL; }

/* The package's own Lua files: a chunk name holding this is library code. */
static const char OWN_LUA[] = "/lua/nr/";

/* A function of the package (lua/nr or the zoo) by its full chunk name. */
static int package_source(const char *source)
{
   return strstr(source, OWN_LUA) || (g_zoo_chunk[0] && !strncmp(source, g_zoo_chunk, strlen(g_zoo_chunk)));
}

/* A message the package's argument checks write: it names its function first, "nr.utilization: ..."
 * or a method as "Tensor:add: ..." / "Trainer:fit: ..." (a capitalised class name, then ':' or '.'
 * and the method's lower-case name); Lua's own runtime errors ("attempt to ...") do not. */
static int check_text(const char *text)
{
   if (!strncmp(text, "nr.", 3)) return 1;
   if (!(*text >= 'A' && *text <= 'Z')) return 0;
   const char *p = text + 1;
   while ((*p >= 'A' && *p <= 'Z') || (*p >= 'a' && *p <= 'z') || (*p >= '0' && *p <= '9') || *p == '_') p++;
   return (*p == ':' || *p == '.') && ((p[1] >= 'a' && p[1] <= 'z') || p[1] == '_');
}

/* The text after the position when msg is one of the package's argument checks raised inside
 * the package itself ("/.../lua/nr/train.lua:882: nr.rejuvenate.attach (lambda): unknown option
 * ..."): a check nested in the library (a recipe's section checked by nr.train) points into it,
 * not at the user's code; else NULL. Checks name their function first (check_text).
 * The handler shows it at the user's calling line instead, when there is one. */
static const char *library_check(const char *msg)
{
   const char *file_end = NULL, *text = after_position(msg, &file_end);
   if (!text) return NULL;
   const size_t n = sizeof OWN_LUA - 1;
   int inside = 0;
   for (const char *p = msg; p + n <= file_end && !inside; p++) inside = strncmp(p, OWN_LUA, n) == 0;
   if (!inside) return NULL;
   return check_text(text) ? text : NULL;
}

/* 1 when msg is one of the package's argument checks already placed at the user's line (the
 * check raised it a level up, "script.lua:2: nr.models.resnet: unknown depth 20 ..."): the frame
 * that raised it is the package's, so a traceback would show only the library's own frames on
 * top of the line the message names. */
static int placed_check(lua_State *L, const char *msg)
{
   const char *text = after_position(msg, NULL);
   if (!text || !check_text(text)) return 0;
   lua_Debug ar;
   for (int level = 1; lua_getstack(L, level, &ar); level++) {
      if (!lua_getinfo(L, "S", &ar) || strcmp(ar.what, "C") == 0) continue;
      return package_source(ar.source);
   }
   return 0;
}

/* Error handler: message plus traceback. A message without a position (error(msg, 0): the
 * library's messages about the user's configuration, e.g. "nr.train: the model has 10 outputs
 * but ...") is shown alone, a traceback would only point into the library; so is one of the
 * library's argument checks raised inside the library (library_check), at the position of the
 * user's code that called the library. NR_TRACEBACK=1 always adds the position and traceback. */
static int traceback(lua_State *L)
{
   const char *msg = lua_tostring(L, 1);
   if (!msg) {
      if (luaL_callmeta(L, 1, "__tostring") && lua_type(L, -1) == LUA_TSTRING) return 1;
      msg = lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
   }
   const char *always = getenv("NR_TRACEBACK");
   const int full = always && always[0] == '1';
   const char *check = full ? NULL : library_check(msg);
   if (check) {
      /* the position of the user's code that called into the library, when it is on the stack
       * (a direct call such as nr.utilization(m, shape, {threshold = 'x'})); none when the
       * library runs the user's configuration itself (a recipe's section) */
      lua_Debug ar;
      for (int level = 1; lua_getstack(L, level, &ar); level++) {
         if (!lua_getinfo(L, "Sl", &ar) || ar.currentline <= 0 || strcmp(ar.what, "C") == 0) continue;
         if (package_source(ar.source)) continue;
         lua_pushfstring(L, "%s:%d: %s", ar.short_src, ar.currentline, check);
         return 1;
      }
      lua_pushstring(L, check);
      return 1;
   }
   /* no position, or a traceback already (kept from where the error happened by a handler that
    * raised it again, nr.train's user_traceback) */
   if ((!has_position(msg) || strstr(msg, "\nstack traceback:") || placed_check(L, msg)) && !full) {
      lua_pushstring(L, msg);
      return 1;
   }
   luaL_traceback(L, L, msg, 1);
   return 1;
}

static int docall(lua_State *L, int narg, int nres)
{
   int base = lua_gettop(L) - narg;
   lua_pushcfunction(L, traceback);
   lua_insert(L, base);
   if (!sigint_ignored) signal(SIGINT, on_sigint);
   /* SIGTERM only over the default action: not over an inherited SIG_IGN, nor over nr.dist's
    * handler (a rank in a collective runs no Lua hook; the launcher's SIGTERM must end it) */
   struct sigaction term;
   sigaction(SIGTERM, NULL, &term);
   const int term_mine = !sigterm_ignored && term.sa_handler == SIG_DFL;
   if (term_mine) signal(SIGTERM, on_sigint);
   int status = lua_pcall(L, narg, nres, base);
   if (!sigint_ignored) signal(SIGINT, SIG_DFL);
   if (term_mine) {
      sigaction(SIGTERM, NULL, &term);
      if (term.sa_handler == on_sigint) signal(SIGTERM, SIG_DFL); /* (one installed meanwhile stays) */
   }
   lua_sethook(L, NULL, 0, 0); /* a SIGINT that came after the Lua code ended */
   lua_remove(L, base);
   return status;
}

static int report(lua_State *L, int status)
{
   if (status && !lua_isnil(L, -1)) {
      const char *msg = lua_tostring(L, -1);
      fprintf(stderr, "nrlua: %s\n", msg ? msg : "(error object is not a string)");
      fflush(stderr);
      lua_pop(L, 1);
   }
   return status;
}

/* Calls require('nr.cli')[fname](...) with the values on the stack. */
static int call_cli(lua_State *L, const char *fname, int narg, int nres)
{
   lua_getglobal(L, "require");
   lua_pushstring(L, "nr.cli");
   if (docall(L, 1, 1)) return 1;
   lua_getfield(L, -1, fname);
   lua_remove(L, -2);
   lua_insert(L, -(narg + 1));
   return docall(L, narg, nres);
}

/* ---- REPL ---------------------------------------------------------------------------- */

/* Ctrl-C at the prompt cancels the input being typed (continuation lines included): SIGINT
 * interrupts the read (no SA_RESTART) and the line is accepted empty, flagged as cancelled. */
static volatile sig_atomic_t prompt_interrupted;
static int line_cancelled;

static void on_prompt_sigint(int sig)
{
   (void)sig;
   prompt_interrupted = 1;
}

static int getc_interruptible(FILE *f)
{
   for (;;) {
      if (prompt_interrupted) {
         rl_replace_line("", 0);
         return '\n';
      }
      unsigned char c;
      ssize_t k = read(fileno(f), &c, 1);
      if (k == 1) return c;
      if (k == 0 || errno != EINTR) return EOF;
   }
}

static char *read_line(int tty, const char *prompt)
{
   line_cancelled = 0;
   if (tty) {
      struct sigaction sa, old;
      memset(&sa, 0, sizeof sa);
      sa.sa_handler = on_prompt_sigint;
      sigemptyset(&sa.sa_mask);
      prompt_interrupted = 0;
      if (!sigint_ignored) sigaction(SIGINT, &sa, &old);
      char *line = readline(prompt);
      if (!sigint_ignored) sigaction(SIGINT, &old, NULL);
      line_cancelled = prompt_interrupted;
      return line;
   }
   static char buf[65536];
   if (!fgets(buf, sizeof buf, stdin)) return NULL;
   size_t n = strlen(buf);
   if (n && buf[n - 1] == '\n') buf[n - 1] = 0;
   return strdup(buf);
}

/* Readline completion: asks nr.cli.complete(text) for candidates. */
static char **completion_list;
static int completion_index;

static char *completion_generator(const char *text, int state)
{
   (void)text;
   if (!completion_list) return NULL;
   (void)state;
   char *c = completion_list[completion_index];
   if (c) completion_index++;
   return c;
}

static char **complete(const char *text, int start, int end)
{
   (void)start;
   (void)end;
   rl_attempted_completion_over = 1;
   lua_State *L = L_global;
   int top = lua_gettop(L);
   lua_pushstring(L, rl_line_buffer);
   lua_pushstring(L, text);
   free(completion_list);
   completion_list = NULL;
   completion_index = 0;
   if (call_cli(L, "complete", 2, 1) == 0 && lua_istable(L, -1)) {
      int n = (int)lua_objlen(L, -1);
      completion_list = calloc((size_t)n + 1, sizeof(char *));
      for (int i = 1; i <= n; i++) {
         lua_rawgeti(L, -1, i);
         completion_list[i - 1] = strdup(lua_tostring(L, -1) ? lua_tostring(L, -1) : "");
         lua_pop(L, 1);
      }
   }
   lua_settop(L, top);
   rl_completion_append_character = 0;
   return rl_completion_matches(text, completion_generator);
}

/* The session's history is saved however it ends: Ctrl-D, or exit() / os.exit() from Lua. */
static char history_path[PATH_MAX];
static void save_history(void) { write_history(history_path); }

/* Returns the exit status: 0, or 1 when stdin is not a terminal and an input failed (a piped
 * session is a script: its errors must reach the caller). */
static int repl(lua_State *L)
{
   int tty = isatty(0);
   if (tty) {
      const char *h = getenv("HOME");
      snprintf(history_path, sizeof history_path, "%s/.nrlua_history", h ? h : ".");
      read_history(history_path);
      atexit(save_history);
      rl_attempted_completion_function = complete;
      rl_catch_signals = 0; /* SIGINT at the prompt: on_prompt_sigint */
      rl_getc_function = getc_interruptible;
      rl_basic_word_break_characters = " \t\n\"\\'><=;+-*/%^~#{}()[],";
      printf("nrlua %s (LuaJIT) — Neural Rejuvenation toolkit. nr is loaded; Ctrl-D quits.\n", NR_VERSION);
      lua_getglobal(L, "require");
      lua_pushstring(L, "nr");
      if (report(L, docall(L, 1, 1)) == 0) lua_setglobal(L, "nr");
      for (;;) {
         char *line = read_line(tty, "> ");
         if (!line) break;
         if (line_cancelled) {
            free(line);
            continue;
         }
         if (*line) add_history(line);
         lua_pushstring(L, line);
         free(line);
         /* accumulate continuation lines until the chunk is complete */
         for (;;) {
            lua_pushvalue(L, -1);
            int status = call_cli(L, "eval", 1, 1);
            if (status == 0 && lua_toboolean(L, -1)) { /* true: needs more input */
               lua_pop(L, 1);
               char *more = read_line(tty, ">> ");
               if (!more) break;
               if (line_cancelled) {
                  free(more);
                  break;
               }
               if (*more) add_history(more);
               lua_pushstring(L, "\n");
               lua_pushstring(L, more);
               free(more);
               lua_concat(L, 3);
               continue;
            }
            if (status) report(L, status);
            else lua_pop(L, 1);
            break;
         }
         lua_settop(L, 0);
         exit_if_terminated(L);
      }
      printf("\n");
   } else {
      /* not a terminal: the same evaluator, statement by statement, echoing results */
      lua_getglobal(L, "require");
      lua_pushstring(L, "nr");
      if (report(L, docall(L, 1, 1)) == 0) lua_setglobal(L, "nr");
      lua_pushstring(L, "");
      for (;;) {
         char *line = read_line(0, "");
         if (!line) break;
         if (lua_objlen(L, -1) > 0) {
            lua_pushstring(L, "\n");
            lua_concat(L, 2);
         }
         lua_pushstring(L, line);
         lua_concat(L, 2);
         free(line);
         lua_pushvalue(L, -1);
         int status = call_cli(L, "eval", 1, 1);
         if (status == 0 && lua_toboolean(L, -1)) {
            lua_pop(L, 1);
            continue;
         }
         if (status) report(L, status);
         else lua_pop(L, 1);
         lua_settop(L, 0);
         exit_if_terminated(L);
         lua_pushstring(L, "");
      }
      /* an unfinished statement at the end of the input is an error, not silently dropped */
      if (lua_objlen(L, -1) > 0) {
         lua_pushboolean(L, 1);
         int status = call_cli(L, "eval", 2, 1);
         if (status) report(L, status);
      }
      lua_settop(L, 0);
      lua_getglobal(L, "require");
      lua_pushstring(L, "nr.cli");
      if (docall(L, 1, 1)) return 1;
      lua_getfield(L, -1, "failures");
      int failed = lua_tonumber(L, -1) > 0;
      lua_settop(L, 0);
      return failed;
   }
   return 0;
}

/* Whether the error on the stack is a Ctrl-C: after a SIGINT, a message whose first line ends
 * in "interrupted" (code that catches and re-raises errors may prefix a position or a layer). */
static int interrupted_error(lua_State *L)
{
   const char *msg = lua_tostring(L, -1);
   if (!interrupted || !msg) return 0;
   const char *nl = strchr(msg, '\n');
   size_t n = nl ? (size_t)(nl - msg) : strlen(msg);
   return n >= 11 && !strncmp(msg + n - 11, "interrupted", 11);
}

/* ---- main ----------------------------------------------------------------------------- */

static void usage(FILE *f)
{
   fprintf(f,
           "usage: nrlua [options] [FILE.lua [args...]]\n"
           "  FILE.lua [args]  run a script, or a recipe (a file returning a table) with\n"
           "                   --field value overrides; FILE.lua --help lists a recipe's fields\n"
           "  -e CODE          run CODE\n"
           "  -i               interactive REPL (the default with no FILE; after FILE when given)\n"
           "  -                as FILE: the script from standard input\n"
           "  -v, --version    print the version\n"
           "  -h, --help       this help\n"
           "environment: NR_THREADS (CPU threads), NRLUA_HOME, NRLUA_LIB, NR_DATA (datasets root)\n");
}

int main(int argc, char **argv)
{
   char home[PATH_MAX], lib[PATH_MAX];
   int script = 0, interactive = 0;
   const char *code = NULL;
   int i = 1;
   for (; i < argc; i++) {
      if (!strcmp(argv[i], "-v") || !strcmp(argv[i], "--version")) {
         printf("nrlua %s (%s)\n", NR_VERSION, LUAJIT_VERSION);
         return 0;
      } else if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) {
         usage(stdout);
         return 0;
      } else if (!strcmp(argv[i], "-e")) {
         if (i + 1 >= argc) {
            fprintf(stderr, "nrlua: -e needs an argument\n");
            return 2;
         }
         code = argv[++i];
      } else if (!strcmp(argv[i], "-i")) {
         interactive = 1;
      } else if (argv[i][0] == '-' && argv[i][1] != 0) {
         fprintf(stderr, "nrlua: unknown option %s\n", argv[i]);
         usage(stderr);
         return 2;
      } else {
         script = i;
         break;
      }
   }
   int where = locate(home, lib, sizeof home);
   if (where != 0) {
      if (where == -1) fprintf(stderr, "nrlua: cannot find the nrlua Lua package (lua/nr/init.lua); set NRLUA_HOME\n");
      return 1;
   }
   lua_State *L = luaL_newstate();
   if (!L) {
      fprintf(stderr, "nrlua: cannot create the Lua state\n");
      return 1;
   }
   L_global = L;
   signal(SIGPIPE, SIG_IGN);
   sigint_ignored = signal(SIGINT, SIG_DFL) == SIG_IGN;
   if (sigint_ignored) signal(SIGINT, SIG_IGN);
   sigterm_ignored = signal(SIGTERM, SIG_DFL) == SIG_IGN;
   if (sigterm_ignored) signal(SIGTERM, SIG_IGN);
   luaL_openlibs(L);
   setup_paths(L, home, lib);
   /* arg table as in luajit: arg[0] = script, arg[1..] = its arguments, negatives before */
   lua_createtable(L, argc, 1);
   for (int j = 0; j < argc; j++) {
      lua_pushstring(L, argv[j]);
      lua_rawseti(L, -2, j - (script ? script : argc));
   }
   lua_setglobal(L, "arg");
   int status = 0;
   if (code) {
      lua_pushstring(L, code);
      interrupted = 0;
      status = call_cli(L, "run_code", 1, 0);
      if (status && interrupted_error(L)) goto sigint;
      status = report(L, status);
      if (status) goto done;
   }
   if (script) {
      lua_pushstring(L, argv[script]);
      lua_newtable(L);
      for (int j = script + 1; j < argc; j++) {
         lua_pushstring(L, argv[j]);
         lua_rawseti(L, -2, j - script);
      }
      interrupted = 0;
      status = call_cli(L, "run_file", 2, 0);
      if (status && interrupted_error(L)) {
         /* nr.cli.interrupted: the message, with the run folder to --resume */
         lua_pop(L, 1);
         lua_pushstring(L, argv[script]);
         if (call_cli(L, "interrupted", 1, 1) || !lua_isstring(L, -1)) {
            lua_settop(L, 0);
            lua_pushstring(L, "interrupted");
         }
         goto sigint;
      }
      report(L, status);
      if (!status && interactive) status = repl(L); /* -i FILE: the REPL after the script, as lua -i */
   } else if (interactive || !code) {
      status = repl(L);
   }
done:
   lua_close(L);
   return status ? 1 : 0;
sigint: /* Ctrl-C: exit as lua.c does, 128 + 2; SIGTERM: end by the signal, as its default would */
   report(L, 1);
   lua_close(L);
   if (interrupted == SIGTERM) die_by_sigterm();
   return 128 + SIGINT;
}
