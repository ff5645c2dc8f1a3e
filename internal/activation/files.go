package activation

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// maxFiles bounds LISTEN_FDS, so that a malformed environment cannot make
// Files walk the whole descriptor table.
const maxFiles = 1 << 16

// Files returns the descriptors a program was started with by socket
// activation (by Command, or by systemd), in order, each named by its
// LISTEN_FDNAMES entry (File.Name; "LISTEN_FD_3" and so on without names).
// It sets close-on-exec on them, so that they do not leak into the
// program's own children. Call it once: the files own the descriptors.
//
// It returns nothing, and no error, when LISTEN_PID is unset or names
// another process (the environment was inherited, not meant for us). A
// malformed LISTEN_FDS, a LISTEN_FDNAMES with a different count, or a
// descriptor that is not open is an error wrapping ErrEnv. With unsetEnv the
// three variables are removed from the environment in every case.
func Files(unsetEnv bool) ([]*os.File, error) {
	if unsetEnv {
		defer func() {
			os.Unsetenv(EnvPID)
			os.Unsetenv(EnvFDs)
			os.Unsetenv(EnvFDNames)
		}()
	}
	pidText, ok := os.LookupEnv(EnvPID)
	if !ok {
		return nil, nil
	}
	pid, err := strconv.Atoi(pidText)
	if err != nil {
		return nil, fmt.Errorf("%w: %s=%q is not a pid", ErrEnv, EnvPID, pidText)
	}
	if pid != os.Getpid() {
		return nil, nil
	}
	nText := os.Getenv(EnvFDs)
	n, err := strconv.Atoi(nText)
	if err != nil || n < 0 || n > maxFiles {
		return nil, fmt.Errorf("%w: %s=%q is not a count from 0 to %d", ErrEnv, EnvFDs, nText, maxFiles)
	}
	var names []string
	if v, ok := os.LookupEnv(EnvFDNames); ok {
		names = strings.Split(v, ":")
		if len(names) != n {
			return nil, fmt.Errorf("%w: %s has %d names for %s=%d", ErrEnv, EnvFDNames, len(names), EnvFDs, n)
		}
	}
	for fd := FirstFD; fd < FirstFD+n; fd++ {
		if _, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err != nil {
			if errors.Is(err, unix.EBADF) {
				return nil, fmt.Errorf("%w: %s=%d but descriptor %d is not open", ErrEnv, EnvFDs, n, fd)
			}
			return nil, fmt.Errorf("activation: fcntl F_GETFD on descriptor %d: %w", fd, err)
		}
	}
	files := make([]*os.File, n)
	for i := range files {
		fd := FirstFD + i
		unix.CloseOnExec(fd)
		name := "LISTEN_FD_" + strconv.Itoa(fd)
		if names != nil {
			name = names[i]
		}
		files[i] = os.NewFile(uintptr(fd), name)
	}
	return files, nil
}
