package main

import (
	"io"
	"os"
	"sync"
	"time"

	"github.com/schollz/progressbar/v3"
	"golang.org/x/term"
)

func isTerminal(f *os.File) bool { return term.IsTerminal(int(f.Fd())) }

// progressBar returns a Progress callback that draws a bar on w, created on
// the first call (when the total is known). The source calls it inside the
// freeze, once per connection: the bar is drawn at most every 100 ms (and
// at the end), not on every call (OptionShowCount would draw each one).
func progressBar(w io.Writer) func(done, total int) {
	var once sync.Once
	var bar *progressbar.ProgressBar
	var mu sync.Mutex
	return func(done, total int) {
		once.Do(func() {
			bar = progressbar.NewOptions(total, progressbar.OptionSetWriter(w),
				progressbar.OptionSetDescription("capturing"), progressbar.OptionShowCount(),
				progressbar.OptionClearOnFinish(), progressbar.OptionThrottle(100*time.Millisecond))
		})
		mu.Lock()
		bar.Set(done)
		mu.Unlock()
	}
}
