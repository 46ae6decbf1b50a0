"""Write README.md from nbs/index.ipynb: its markdown cells, and the markdown its code cells display (the measured
tables, rendered by code from measurements/*.json, and this machine's hardware report).
Usage: python .ci/readme.py            # rewrite README.md
       python .ci/readme.py --check    # exit 1 when README.md's measured tables differ from what the notebook renders
nbdev's own `nbdev_readme` needs quarto, which is not installable here; this does the same for the cells index uses."""
import os, re, sys
from pathlib import Path
from execnb.nbio import read_nb
from execnb.shell import CaptureShell

root = Path(__file__).resolve().parent.parent

def _directives(src:str) -> set: return {m.group(1) for m in re.finditer(r'^#\|\s*([\w:-]+)', src, re.M)}

def render() -> str:
    nb, parts = read_nb(root / 'nbs' / 'index.ipynb'), []
    os.chdir(root / 'nbs')
    sh = CaptureShell()
    for c in nb.cells:
        if c.cell_type == 'markdown': parts.append(c.source.strip()); continue
        d = _directives(c.source)
        if 'notest' in d or 'eval:' in d: continue
        outs = sh.run(c.source)
        if err := [o for o in outs if o.get('output_type') == 'error']:
            sys.exit(f'index.ipynb: a cell failed ({err[0]["ename"]}: {err[0]["evalue"]}):\n{c.source}')
        if 'hide' in d: continue
        for o in outs:
            md = o.get('data', {}).get('text/markdown')
            if md: parts.append((''.join(md) if isinstance(md, list) else md).strip())
    return '\n\n'.join(parts) + '\n'

def _tables(text:str) -> list: return [l for l in text.splitlines() if l.startswith('|')]

if __name__ == '__main__':
    new = render()
    if '--check' in sys.argv:
        old = (root / 'README.md').read_text()
        machine = re.compile(r'^\| (kind|device|memory per device|compute capability|dtype|torch|torch_xla|JAX|CPU|note) \|')
        a, b = ([l for l in _tables(t) if not machine.match(l)] for t in (old, new))
        if a != b: sys.exit('README.md is out of date: run `python .ci/readme.py` and commit it')
        print('README.md: in sync with nbs/index.ipynb and measurements/')
    else:
        (root / 'README.md').write_text(new); print('wrote README.md')
