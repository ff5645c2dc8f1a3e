package activation

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// The environment variables of socket activation.
const (
	EnvPID     = "LISTEN_PID"
	EnvFDs     = "LISTEN_FDS"
	EnvFDNames = "LISTEN_FDNAMES"
)

// FirstFD is the descriptor number of the first inherited socket
// (SD_LISTEN_FDS_START).
const FirstFD = 3

// MaxEnvString is the kernel's limit on one environment string
// (MAX_ARG_STRLEN, 32 pages, its terminating NUL included). LISTEN_FDNAMES
// for more than a few thousand connections would exceed it; Command then
// leaves the names out, and the program sees LISTEN_FDS alone.
const MaxEnvString = 32*4096 - 1

// shell runs the program. It is /bin/sh rather than $SHELL: POSIX, present
// on every Linux system, and it reads no startup file when run with -c.
const shell = "/bin/sh"

// script sets LISTEN_PID to the shell's own pid, which exec hands on to the
// program, and runs the program ("$0") with its arguments ("$@"). It is a
// constant: the program and arguments are positional parameters, which the
// shell never parses, so no argument can inject shell syntax.
const script = `LISTEN_PID=$$; export LISTEN_PID; exec "$0" "$@"`

// Command returns a command that runs the program name with args, with
// files inherited as descriptors 3, 4, … in order and announced in
// LISTEN_FDS, LISTEN_PID and LISTEN_FDNAMES (names, which must be empty or
// one per file; each 1 to 255 bytes of [A-Za-z0-9._-], such as those Name
// makes). name is looked up in PATH as exec.Command does.
//
// LISTEN_PID must be the program's own pid, which is only known after fork,
// so the command is /bin/sh running a constant script that exports
// LISTEN_PID=$$ and execs the program in place of the shell (same pid):
//
//	/bin/sh -c 'LISTEN_PID=$$; export LISTEN_PID; exec "$0" "$@"' /path/to/program args...
//
// The program path and the arguments are positional parameters and are
// never parsed by the shell. (The alternative, re-executing our own binary
// in a hidden mode, would need every binary that uses this package, tests
// included, to dispatch that mode first thing in main.)
//
// The command's Env is the current environment without any LISTEN_*
// variables, plus LISTEN_FDS and (if names are given and fit in
// MaxEnvString) LISTEN_FDNAMES;
// callers may add to it but must keep those. Its ExtraFiles are files:
// exec.Cmd dup2s them to 3, 4, … without close-on-exec. Command puts each
// file in blocking mode now, as systemd passes sockets and as most programs
// expect; a Go program that wants non-blocking I/O gets it back from
// net.FileConn. The mode is shared with the caller's copies, which the
// caller should close once the command has started.
func Command(ctx context.Context, name string, args []string, files []*os.File, names []string) (*exec.Cmd, error) {
	if len(names) != 0 && len(names) != len(files) {
		return nil, fmt.Errorf("%w: %d names for %d files", ErrInvalid, len(names), len(files))
	}
	for i, n := range names {
		if !ValidName(n) {
			return nil, fmt.Errorf("%w: name %d (%q) is not 1 to %d bytes of [A-Za-z0-9._-]", ErrInvalid, i, n, MaxNameLen)
		}
	}
	path, err := exec.LookPath(name)
	if err != nil {
		return nil, fmt.Errorf("activation: find %s: %w", name, err)
	}
	if !filepath.IsAbs(path) {
		// Relative paths always contain a slash here; "./" keeps one that
		// starts with '-' from reading as an option of exec.
		path = "." + string(filepath.Separator) + filepath.Clean(path)
	}
	for i, f := range files {
		if f == nil {
			return nil, fmt.Errorf("%w: file %d is nil", ErrInvalid, i)
		}
		if err := setBlocking(f); err != nil {
			return nil, fmt.Errorf("activation: make %s (file %d) blocking: %w", f.Name(), i, err)
		}
	}
	cmd := exec.CommandContext(ctx, shell, append([]string{"-c", script, path}, args...)...)
	env := make([]string, 0, len(os.Environ())+2)
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		if k != EnvPID && k != EnvFDs && k != EnvFDNames {
			env = append(env, kv)
		}
	}
	env = append(env, EnvFDs+"="+strconv.Itoa(len(files)))
	if fdnames := EnvFDNames + "=" + strings.Join(names, ":"); len(names) > 0 && len(fdnames) < MaxEnvString {
		env = append(env, fdnames)
	}
	cmd.Env = env
	cmd.ExtraFiles = files
	return cmd, nil
}

func setBlocking(f *os.File) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := rc.Control(func(fd uintptr) { serr = unix.SetNonblock(int(fd), false) }); err != nil {
		return err
	}
	return os.NewSyscallError("fcntl F_SETFL", serr)
}
