// mirrorfs-keeper: holds a mirrorfs mount's /dev/fuse descriptor and nothing else, so the
// connection outlives the server that serves it (SPEC 11). It starts the server, receives
// the descriptor once the server has mounted, and starts a new server when one dies (the
// new one takes the connection over and has the kernel resend what was in flight). It
// forwards SIGTERM/SIGINT/SIGHUP, hands over on SIGUSR1 (re-executing itself from its
// binary on disk first, for an upgrade), bounds the restart rate, and unmounts when it
// gives up. libc only.
//
//   mirrorfs-keeper --mountpoint DIR [state...] -- SERVER ARGS...
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

// Descriptor numbers the server finds its halves at.
enum { SERVER_FUSE_FD = 20, SERVER_CHANNEL_FD = 21 };
// A server that dies this many times in a row before serving ends the mount.
enum { MAX_START_FAILURES = 5 };
// At most this many restarts in RATE_WINDOW seconds.
enum { MAX_RESTARTS_PER_WINDOW = 30, RATE_WINDOW = 60 };
// The server's exit status for a planned hand-over.
enum { EXIT_HANDOVER = 75 };

static const char *mountpoint;
static char self_path[PATH_MAX];
static int fuse_fd = -1;
static int channel = -1;       // the keeper's end; the server's is passed at each start
static int server_end = -1;
static pid_t server = 0;
static int restarts = 0;
static int start_failures = 0;
static int served_since_start = 0;
static int resend_supported = 1;
static int stopping = 0;
static int hand_over_pending = 0;  // asked while the server was not serving yet
static int ready_fd = -1;      // the daemonizing caller's pipe: the first server's only
static char last_error[600];
// Files a server keeps beside its control socket, removed when the mount ends without it.
enum { MAX_LEFT = 4 };
static char left_behind[MAX_LEFT][600];
static time_t restart_times[MAX_RESTARTS_PER_WINDOW];
static char **server_argv;
static int server_argc;

// One log line, as the server writes its own: `2025-01-31T12:00:00Z mirrorfs-keeper[PID]: …`.
static void say(const char *format, ...) {
    char line[1200];
    time_t now = time(NULL);
    struct tm utc;
    gmtime_r(&now, &utc);
    int head = (int)strftime(line, 32, "%Y-%m-%dT%H:%M:%SZ", &utc);
    head += snprintf(line + head, 48, " mirrorfs-keeper[%d]: ", (int)getpid());
    va_list args;
    va_start(args, format);
    int n = vsnprintf(line + head, sizeof line - 1 - (size_t)head, format, args);
    va_end(args);
    if (n < 0) return;
    n += head;
    if (n > (int)sizeof line - 2) n = sizeof line - 2;
    line[n++] = '\n';
    // Never fatal: a closed or full log loses the line.
    ssize_t ignored = write(2, line, (size_t)n);
    (void)ignored;
}

static void describe_status(int status, char *out, size_t size) {
    if (WIFSIGNALED(status)) {
        int sig = WTERMSIG(status);
        snprintf(out, size, "killed by signal %d (SIG%s)", sig, sigabbrev_np(sig) ? sigabbrev_np(sig) : "?");
    } else {
        snprintf(out, size, "exited with status %d", WEXITSTATUS(status));
    }
}

static void unmount_now(void) {
    if (!mountpoint) return;
    if (geteuid() == 0) {
        if (umount2(mountpoint, MNT_DETACH) != 0 && errno != EINVAL && errno != ENOENT)
            say("cannot unmount %s: %s", mountpoint, strerror(errno));
        return;
    }
    pid_t pid;
    char *argv[] = { "fusermount3", "-u", "-q", "-z", "--", (char *)mountpoint, NULL };
    if (posix_spawnp(&pid, "fusermount3", NULL, NULL, argv, environ) == 0) {
        int status;
        while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {}
    }
}

// The mount ends while no server can clean up after itself (its socket, its record).
static void remove_left_behind(void) {
    for (int i = 0; i < MAX_LEFT; i++) if (left_behind[i][0]) unlink(left_behind[i]);
}

static void finish(int code) {
    if (fuse_fd >= 0) close(fuse_fd);
    exit(code);
}

// The server's arguments for this start: the mount command, without the caller's ready
// pipe after the first start, and with the keeper's state.
static char **arguments_for_start(const char *cause) {
    static char fuse_arg[16], channel_arg[16], restarts_arg[16];
    char **argv = calloc((size_t)server_argc + 12, sizeof *argv);
    if (!argv) return NULL;
    int n = 0;
    for (int i = 0; i < server_argc; i++) {
        if (restarts > 0 && strcmp(server_argv[i], "--ready-fd") == 0 && i + 1 < server_argc) { i++; continue; }
        argv[n++] = server_argv[i];
    }
    snprintf(channel_arg, sizeof channel_arg, "%d", SERVER_CHANNEL_FD);
    argv[n++] = "--keeper-fd";
    argv[n++] = channel_arg;
    if (fuse_fd >= 0) {
        snprintf(fuse_arg, sizeof fuse_arg, "%d", SERVER_FUSE_FD);
        argv[n++] = "--fuse-fd";
        argv[n++] = fuse_arg;
    }
    if (restarts > 0) {
        snprintf(restarts_arg, sizeof restarts_arg, "%d", restarts);
        argv[n++] = "--restarts";
        argv[n++] = restarts_arg;
        argv[n++] = "--restart-cause";
        argv[n++] = (char *)cause;
    }
    argv[n] = NULL;
    return argv;
}

static int start_server(const char *cause) {
    char **argv = arguments_for_start(cause);
    if (!argv) return -1;
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    // dup2 to another number clears close-on-exec in the server.
    posix_spawn_file_actions_adddup2(&actions, server_end, SERVER_CHANNEL_FD);
    if (fuse_fd >= 0) posix_spawn_file_actions_adddup2(&actions, fuse_fd, SERVER_FUSE_FD);
    posix_spawnattr_t attributes;
    posix_spawnattr_init(&attributes);
    sigset_t none;
    sigemptyset(&none);
    posix_spawnattr_setsigmask(&attributes, &none);
    posix_spawnattr_setflags(&attributes, POSIX_SPAWN_SETSIGMASK);
    int error = posix_spawn(&server, argv[0], &actions, &attributes, argv, environ);
    posix_spawn_file_actions_destroy(&actions);
    posix_spawnattr_destroy(&attributes);
    free(argv);
    if (error != 0) {
        server = 0;
        say("cannot start the server %s: %s", server_argv[0], strerror(error));
        return -1;
    }
    served_since_start = 0;
    last_error[0] = 0;
    if (ready_fd >= 0) { close(ready_fd); ready_fd = -1; }
    return 0;
}

static void hand_over(void);

// One message from the server: "mounted" with the descriptor, "serving", "no-resend", "error TEXT".
static int read_message(void) {
    char text[600];
    char control[CMSG_SPACE(sizeof(int))];
    struct iovec iov = { .iov_base = text, .iov_len = sizeof text - 1 };
    struct msghdr message = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = control, .msg_controllen = sizeof control };
    ssize_t n = recvmsg(channel, &message, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
    if (n <= 0) return 0;
    text[n] = 0;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&message); c; c = CMSG_NXTHDR(&message, c)) {
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
            int fd;
            memcpy(&fd, CMSG_DATA(c), sizeof fd);
            if (fuse_fd < 0 && strcmp(text, "mounted") == 0) fuse_fd = fd; else close(fd);
        }
    }
    if (strcmp(text, "serving") == 0) {
        served_since_start = 1;
        start_failures = 0;
        if (hand_over_pending) { hand_over_pending = 0; hand_over(); }
    }
    else if (strcmp(text, "no-resend") == 0) resend_supported = 0;
    else if (strncmp(text, "file ", 5) == 0) {
        for (int i = 0; i < MAX_LEFT; i++) {
            if (strcmp(left_behind[i], text + 5) == 0) break;
            if (left_behind[i][0] == 0) { snprintf(left_behind[i], sizeof left_behind[i], "%s", text + 5); break; }
        }
    }
    else if (strncmp(text, "error ", 6) == 0) snprintf(last_error, sizeof last_error, "%s", text + 6);
    return 1;
}

// Every message queued (a server says several things before it dies).
static void read_channel(void) {
    while (read_message()) {}
}

static int restart_rate_exceeded(void) {
    time_t now = time(NULL);
    int recent = 0;
    for (int i = 0; i < MAX_RESTARTS_PER_WINDOW; i++)
        if (restart_times[i] && now - restart_times[i] < RATE_WINDOW) recent++;
    restart_times[restarts % MAX_RESTARTS_PER_WINDOW] = now;
    return recent >= MAX_RESTARTS_PER_WINDOW;
}

static void give_up(const char *why) {
    unmount_now();
    remove_left_behind();
    say("%s; unmounted %s", why, mountpoint);
    finish(1);
}

static void server_ended(int status) {
    char how[96];
    describe_status(status, how, sizeof how);
    server = 0;
    if (stopping || fuse_fd < 0 || (WIFEXITED(status) && WEXITSTATUS(status) == 0)) {
        // The end of the mount, or a first start that failed (the server said why).
        if (fuse_fd >= 0 && !(WIFEXITED(status) && WEXITSTATUS(status) == 0)) { unmount_now(); remove_left_behind(); }
        finish(WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status));
    }
    int planned = WIFEXITED(status) && WEXITSTATUS(status) == EXIT_HANDOVER;
    if (!planned && !resend_supported)
        give_up("the server died and this kernel cannot resend its requests (no FUSE_HAS_RESEND): the mount ends with it");
    // What happened to it ("killed by signal 9 (SIGKILL)[: its last error]"), and the cause.
    char happened[720], cause[800];
    if (last_error[0]) snprintf(happened, sizeof happened, "%s: %s", how, last_error);
    else snprintf(happened, sizeof happened, "%s", how);
    if (planned) snprintf(cause, sizeof cause, "planned restart");
    else snprintf(cause, sizeof cause, "the server %s", happened);
    if (!planned && !served_since_start) {
        start_failures++;
        if (start_failures >= MAX_START_FAILURES) {
            char why[1000];
            snprintf(why, sizeof why, "the server failed to start %d times in a row (last: %s)", start_failures, happened);
            give_up(why);
        }
        // 100, 200, 400, 800 ms between failed starts.
        struct timespec pause = { 0, 100000000L << (start_failures - 1) };
        while (nanosleep(&pause, &pause) != 0 && errno == EINTR) {}
    }
    if (restart_rate_exceeded()) {
        char why[1000];
        snprintf(why, sizeof why, "the server was restarted %d times within %d s (last: %s)", MAX_RESTARTS_PER_WINDOW, RATE_WINDOW, cause);
        give_up(why);
    }
    restarts++;
    say("%s; starting a new server (restart %d)", cause, restarts);
    if (start_server(cause) != 0) give_up("no server could be started");
}

// For an upgrade: the keeper runs its binary on disk again, keeping every descriptor and
// its child, then asks the server to hand over.
static void reexec_self(void) {
    char fd_arg[16], channel_arg[16], server_arg[16], restarts_arg[16], end_arg[16];
    snprintf(fd_arg, sizeof fd_arg, "%d", fuse_fd);
    snprintf(channel_arg, sizeof channel_arg, "%d", channel);
    snprintf(end_arg, sizeof end_arg, "%d", server_end);
    snprintf(server_arg, sizeof server_arg, "%d", (int)server);
    snprintf(restarts_arg, sizeof restarts_arg, "%d", restarts);
    char **argv = calloc((size_t)server_argc + 20, sizeof *argv);
    if (!argv) return;
    int n = 0;
    argv[n++] = self_path;
    argv[n++] = "--mountpoint"; argv[n++] = (char *)mountpoint;
    argv[n++] = "--fuse-fd"; argv[n++] = fd_arg;
    argv[n++] = "--channel-fd"; argv[n++] = channel_arg;
    argv[n++] = "--server-end-fd"; argv[n++] = end_arg;
    argv[n++] = "--server-pid"; argv[n++] = server_arg;
    argv[n++] = "--restarts"; argv[n++] = restarts_arg;
    argv[n++] = "--hand-over";
    argv[n++] = "--";
    for (int i = 0; i < server_argc; i++) argv[n++] = server_argv[i];
    argv[n] = NULL;
    // The descriptors survive the exec.
    fcntl(fuse_fd, F_SETFD, 0);
    fcntl(channel, F_SETFD, 0);
    fcntl(server_end, F_SETFD, 0);
    execv(self_path, argv);
    say("cannot run the keeper %s again (%s); handing over with this one", self_path, strerror(errno));
    fcntl(fuse_fd, F_SETFD, FD_CLOEXEC);
    fcntl(channel, F_SETFD, FD_CLOEXEC);
    fcntl(server_end, F_SETFD, FD_CLOEXEC);
    free(argv);
}

static void hand_over(void) {
    say("planned restart of the server (pid %d)", (int)server);
    reexec_self();
    kill(server, SIGUSR1);
}

static int number(const char *text) {
    char *end;
    long value = strtol(text, &end, 10);
    if (*text == 0 || *end != 0 || value < 0 || value > INT_MAX) {
        say("not a number: '%s'", text);
        exit(2);
    }
    return (int)value;
}

int main(int argc, char **argv) {
    int asked_to_hand_over = 0;
    int i = 1;
    for (; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--") == 0) { i++; break; }
        if (i + 1 >= argc && strcmp(a, "--hand-over") != 0) { say("%s needs a value", a); return 2; }
        if (strcmp(a, "--mountpoint") == 0) mountpoint = argv[++i];
        else if (strcmp(a, "--fuse-fd") == 0) fuse_fd = number(argv[++i]);
        else if (strcmp(a, "--channel-fd") == 0) channel = number(argv[++i]);
        else if (strcmp(a, "--server-end-fd") == 0) server_end = number(argv[++i]);
        else if (strcmp(a, "--server-pid") == 0) server = number(argv[++i]);
        else if (strcmp(a, "--restarts") == 0) restarts = number(argv[++i]);
        else if (strcmp(a, "--hand-over") == 0) asked_to_hand_over = 1;
        else { say("unknown option '%s'", a); return 2; }
    }
    if (!mountpoint || i >= argc) {
        say("usage: mirrorfs-keeper --mountpoint DIR -- SERVER ARGS...");
        return 2;
    }
    server_argv = argv + i;
    server_argc = argc - i;
    ssize_t len = readlink("/proc/self/exe", self_path, sizeof self_path - 1);
    if (len <= 0) { snprintf(self_path, sizeof self_path, "%s", argv[0]); len = (ssize_t)strlen(self_path); }
    self_path[len] = 0;
    // After an upgrade /proc/self/exe names the replaced file.
    char *deleted = strstr(self_path, " (deleted)");
    if (deleted) *deleted = 0;
    // The caller's ready pipe belongs to the first server only; a keeper run again
    // (channel given) closed it long ago, and its number may be another descriptor now.
    if (channel < 0)
        for (int j = 0; j + 1 < server_argc; j++)
            if (strcmp(server_argv[j], "--ready-fd") == 0) ready_fd = number(server_argv[j + 1]);

    sigset_t handled;
    sigemptyset(&handled);
    int signals[] = { SIGCHLD, SIGTERM, SIGINT, SIGHUP, SIGUSR1 };
    for (size_t s = 0; s < sizeof signals / sizeof *signals; s++) sigaddset(&handled, signals[s]);
    sigprocmask(SIG_BLOCK, &handled, NULL);
    signal(SIGPIPE, SIG_IGN);
    int signals_fd = signalfd(-1, &handled, SFD_CLOEXEC);
    if (signals_fd < 0) { say("signalfd: %s", strerror(errno)); return 1; }

    if (channel < 0) {
        int pair[2];
        if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, pair) != 0) {
            say("socketpair: %s", strerror(errno));
            return 1;
        }
        channel = pair[0];
        server_end = pair[1];
        if (start_server(NULL) != 0) return 1;
    } else {
        fcntl(fuse_fd, F_SETFD, FD_CLOEXEC);
        fcntl(channel, F_SETFD, FD_CLOEXEC);
        fcntl(server_end, F_SETFD, FD_CLOEXEC);
        if (asked_to_hand_over && server > 0) kill(server, SIGUSR1);
    }

    for (;;) {
        struct pollfd fds[2] = { { .fd = signals_fd, .events = POLLIN }, { .fd = channel, .events = POLLIN } };
        if (poll(fds, 2, -1) < 0) {
            if (errno == EINTR) continue;
            say("poll: %s", strerror(errno));
            finish(1);
        }
        if (fds[1].revents & POLLIN) read_channel();
        if (!(fds[0].revents & POLLIN)) continue;
        struct signalfd_siginfo info;
        if (read(signals_fd, &info, sizeof info) != sizeof info) continue;
        switch (info.ssi_signo) {
        case SIGCHLD: {
            int status;
            pid_t pid;
            while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
                if (pid != server) continue;
                // What the server said last (its error line) arrives before its end.
                read_channel();
                server_ended(status);
            }
            break;
        }
        case SIGUSR1:
            // A server that is still starting has no handler for it yet: it hands over
            // once it serves.
            if (server > 0 && fuse_fd >= 0 && !stopping) {
                if (served_since_start) hand_over(); else hand_over_pending = 1;
            }
            break;
        default:
            stopping = 1;
            if (server > 0) kill(server, (int)info.ssi_signo);
            else { unmount_now(); finish(0); }
        }
    }
}
