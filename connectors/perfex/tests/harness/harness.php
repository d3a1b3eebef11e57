<?php

/**
 * A small harness for the module's tests: just enough of Perfex CRM's surface (it is not a CRM) to
 * load `perfex_webhooks/` and drive it: `hooks()` (actions with priorities and accepted_args),
 * `get_instance()` with `$CI->db` (CodeIgniter 3 query-builder calls over PDO SQLite), models whose
 * records a test sets, `$CI->load->model()`, options (`get_option`/`add_option`/`update_option`),
 * `register_activation_hook`, `db_prefix()`, `log_message`.
 */

declare(strict_types=1);

defined('BASEPATH') or define('BASEPATH', __DIR__);

const HARNESS_MODULE_DIR = __DIR__ . '/../../perfex_webhooks';

require_once HARNESS_MODULE_DIR . '/src/autoload.php';

final class HarnessHooks
{
    /** @var array<string, array<int, list<array{0: callable, 1: int}>>> */
    public array $actions = [];

    public function add_action(string $tag, callable $fn, int $priority = 10, int $acceptedArgs = 1): void
    {
        $this->actions[$tag][$priority][] = [$fn, $acceptedArgs];
    }

    public function do_action(string $tag, mixed ...$args): void
    {
        $byPriority = $this->actions[$tag] ?? [];
        ksort($byPriority);
        foreach ($byPriority as $listeners) {
            foreach ($listeners as [$fn, $accepted]) {
                $fn(...array_slice($args, 0, $accepted));
            }
        }
    }

    public function has_action(string $tag): bool
    {
        return !empty($this->actions[$tag]);
    }
}

/** A Perfex model stand-in: get($id) (or any getter) returns the record the test stored, as an object. */
final class HarnessModel
{
    /** @var array<string, array> */
    public array $records = [];
    /** @var list<array{0: string, 1: array}> */
    public array $calls = [];

    public function __call(string $method, array $args): mixed
    {
        $this->calls[] = [$method, $args];
        $record = $this->records[(string) ($args[0] ?? '')] ?? null;
        return $record === null ? null : (object) $record;
    }
}

final class HarnessLoader
{
    public function __construct(private HarnessCI $ci)
    {
    }

    public function model(string $name): void
    {
        $name = strtolower($name);
        if (!isset($this->ci->{$name})) {
            $this->ci->{$name} = new HarnessModel();
        }
    }
}

#[AllowDynamicProperties]
final class HarnessCI
{
    public HarnessDb $db;
    public HarnessLoader $load;

    public function __construct(HarnessDb $db)
    {
        $this->db = $db;
        $this->load = new HarnessLoader($this);
    }

    public function model(string $name): HarnessModel
    {
        $this->load->model($name);
        return $this->{strtolower($name)};
    }
}

final class HarnessResult
{
    public function __construct(private array $rows)
    {
    }

    public function result_array(): array
    {
        return $this->rows;
    }

    public function row_array(): ?array
    {
        return $this->rows[0] ?? null;
    }
}

/** The subset of CodeIgniter 3's query builder the module uses, on PDO SQLite. */
final class HarnessDb
{
    public PDO $pdo;
    public string $char_set = 'utf8mb4';
    private array $wheres = [];
    private array $params = [];
    private array $sets = [];
    private string $select = '*';
    private string $order = '';
    private string $limit = '';
    private int $affected = 0;
    /** Set by a test to make every statement fail (a database outage). */
    public bool $broken = false;

    public function __construct(string $path = ':memory:')
    {
        $this->pdo = new PDO('sqlite:' . $path, null, null, [PDO::ATTR_ERRMODE => PDO::ERRMODE_EXCEPTION]);
        $this->pdo->exec('PRAGMA busy_timeout = 5000');
    }

    /** Raw SQL; MySQL table options and AUTO_INCREMENT are mapped to SQLite's spelling. */
    public function query(string $sql): bool
    {
        $this->check();
        $sql = preg_replace('/\)\s*ENGINE=.*;?\s*$/s', ')', $sql);
        $sql = str_replace('`', '"', $sql);
        $sql = str_replace(['BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY', 'MEDIUMTEXT'], ['INTEGER PRIMARY KEY AUTOINCREMENT', 'TEXT'], $sql);
        $this->pdo->exec($sql);
        return true;
    }

    public function select(string $columns): self
    {
        $this->select = $columns;
        return $this;
    }

    public function where(string $key, mixed $value): self
    {
        $op = '=';
        if (preg_match('/^(\w+)\s*(<=|>=|<>|!=|<|>)$/', trim($key), $m)) {
            [$key, $op] = [$m[1], $m[2]];
        }
        $this->wheres[] = "\"$key\" $op ?";
        $this->params[] = $value;
        return $this;
    }

    public function where_in(string $key, array $values): self
    {
        $this->wheres[] = "\"$key\" IN (" . implode(',', array_fill(0, count($values), '?')) . ')';
        array_push($this->params, ...array_values($values));
        return $this;
    }

    public function order_by(string $column, string $direction = 'ASC'): self
    {
        $this->order = " ORDER BY \"$column\" " . (strtoupper($direction) === 'DESC' ? 'DESC' : 'ASC');
        return $this;
    }

    public function limit(int $n): self
    {
        $this->limit = ' LIMIT ' . $n;
        return $this;
    }

    public function set(string $key, mixed $value, bool $escape = true): self
    {
        $this->sets[$key] = [$value, $escape];
        return $this;
    }

    public function get(string $table): HarnessResult
    {
        $stmt = $this->run("SELECT {$this->select} FROM \"$table\"" . $this->whereSql() . $this->order . $this->limit);
        return new HarnessResult($stmt->fetchAll(PDO::FETCH_ASSOC));
    }

    public function insert(string $table, array $row): bool
    {
        $cols = implode(',', array_map(fn ($c) => "\"$c\"", array_keys($row)));
        $this->params = array_values($row);
        $this->run("INSERT INTO \"$table\" ($cols) VALUES (" . implode(',', array_fill(0, count($row), '?')) . ')');
        return true;
    }

    public function update(string $table, array $data = []): bool
    {
        $assign = [];
        $params = [];
        foreach ($this->sets as $key => [$value, $escape]) {
            if ($escape) {
                $assign[] = "\"$key\" = ?";
                $params[] = $value;
            } else {
                $assign[] = "\"$key\" = $value";
            }
        }
        foreach ($data as $key => $value) {
            $assign[] = "\"$key\" = ?";
            $params[] = $value;
        }
        $this->params = [...$params, ...$this->params];
        $this->run("UPDATE \"$table\" SET " . implode(', ', $assign) . $this->whereSql());
        return true;
    }

    public function delete(string $table): bool
    {
        $this->run("DELETE FROM \"$table\"" . $this->whereSql());
        return true;
    }

    public function count_all_results(string $table): int
    {
        return (int) $this->run("SELECT COUNT(*) FROM \"$table\"" . $this->whereSql())->fetchColumn();
    }

    public function affected_rows(): int
    {
        return $this->affected;
    }

    private function whereSql(): string
    {
        return $this->wheres === [] ? '' : ' WHERE ' . implode(' AND ', $this->wheres);
    }

    private function run(string $sql): PDOStatement
    {
        $params = $this->params;
        $this->wheres = $this->params = $this->sets = [];
        $this->select = '*';
        $this->order = $this->limit = '';
        $this->check();
        $stmt = $this->pdo->prepare($sql);
        $stmt->execute($params);
        $this->affected = $stmt->rowCount();
        return $stmt;
    }

    private function check(): void
    {
        if ($this->broken) {
            $this->wheres = $this->params = $this->sets = [];
            throw new RuntimeException('harness: database unavailable');
        }
    }
}

// ---- Perfex's global functions --------------------------------------------------------------------
$GLOBALS['harness'] = ['hooks' => new HarnessHooks(), 'ci' => null, 'options' => [], 'log' => [], 'activation' => [], 'staff' => 0];

function hooks(): HarnessHooks
{
    return $GLOBALS['harness']['hooks'];
}

function &get_instance(): HarnessCI
{
    return $GLOBALS['harness']['ci'];
}

function db_prefix(): string
{
    return 'tbl';
}

function get_option(string $name): string
{
    return (string) ($GLOBALS['harness']['options'][$name] ?? '');
}

function add_option(string $name, mixed $value = '', int $autoload = 1): bool
{
    if (array_key_exists($name, $GLOBALS['harness']['options'])) {
        return false;
    }
    $GLOBALS['harness']['options'][$name] = (string) $value;
    return true;
}

function update_option(string $name, mixed $value): bool
{
    $GLOBALS['harness']['options'][$name] = (string) $value;
    return true;
}

function register_activation_hook(string $module, callable $fn): void
{
    $GLOBALS['harness']['activation'][$module] = $fn;
}

function register_uninstall_hook(string $module, callable $fn): void
{
    $GLOBALS['harness']['uninstall'][$module] = $fn;
}

function delete_option(string $name): bool
{
    unset($GLOBALS['harness']['options'][$name]);
    return true;
}

function log_message(string $level, string $message): void
{
    $GLOBALS['harness']['log'][] = "$level: $message";
    if (getenv('HARNESS_VERBOSE')) {
        fwrite(STDERR, "$level: $message\n");
    }
}

function get_staff_user_id(): int
{
    return (int) $GLOBALS['harness']['staff'];
}

function is_admin(): bool
{
    return true;
}

function admin_url(string $path = ''): string
{
    return 'http://crm.test/admin/' . $path;
}

// ---- the admin area, for the settings page (controllers/Perfex_webhooks.php, views/settings.php) ----
final class HarnessRedirect extends RuntimeException
{
}

final class HarnessInput
{
    public function __construct(private array $post)
    {
    }

    public function post(?string $name = null): mixed
    {
        return $name === null ? $this->post : ($this->post[$name] ?? null);
    }
}

final class HarnessViewLoader
{
    public string $output = '';

    public function view(string $name, array $data = []): void
    {
        ob_start();
        (static function (string $__file, array $__data): void {
            extract($__data);
            require $__file;
        })(HARNESS_MODULE_DIR . '/views/' . $name . '.php', $data);
        $this->output .= (string) ob_get_clean();
    }
}

/** Perfex's base class of admin controllers: the POST data a test gives, and view rendering. */
class AdminController
{
    public HarnessInput $input;
    public HarnessViewLoader $load;

    public function __construct()
    {
        $this->input = new HarnessInput($GLOBALS['harness']['post'] ?? []);
        $this->load = new HarnessViewLoader();
    }
}

function set_alert(string $type, string $message): void
{
    $GLOBALS['harness']['alerts'][] = [$type, $message];
}

function redirect(string $url): never
{
    throw new HarnessRedirect($url);
}

function access_denied(string $what): never
{
    throw new RuntimeException("access denied: $what");
}

function html_escape(mixed $value): string
{
    return htmlspecialchars((string) $value, ENT_QUOTES, 'UTF-8');
}

function form_open(string $action): string
{
    return '<form method="post" action="' . html_escape($action) . '">';
}

function form_close(): string
{
    return '</form>';
}

function init_head(): void
{
    echo '<html><body>';
}

function init_tail(): void
{
}

/** Run a controller action as Perfex would; returns [page HTML, redirect URL or null]. */
function harness_admin(string $action, array $post = []): array
{
    require_once HARNESS_MODULE_DIR . '/controllers/Perfex_webhooks.php';
    $GLOBALS['harness']['post'] = $post;
    $GLOBALS['harness']['alerts'] = [];
    $controller = new Perfex_webhooks();
    try {
        $controller->{$action}();
    } catch (HarnessRedirect $r) {
        return [$controller->load->output, $r->getMessage()];
    }
    return [$controller->load->output, null];
}

// ---- driving it ----------------------------------------------------------------------------------
/**
 * A fresh harness: new hooks, a new database (':memory:' or a file, kept between runs), the given
 * options; loads the module (once per process) and boots it on the new hooks; runs its activation.
 */
function harness_start(string $dbPath = ':memory:', array $options = []): HarnessCI
{
    $GLOBALS['harness']['hooks'] = new HarnessHooks();
    $GLOBALS['harness']['ci'] = new HarnessCI(new HarnessDb($dbPath));
    $GLOBALS['harness']['options'] = [];
    $GLOBALS['harness']['log'] = [];
    // Perfex core tables the module reads directly (records without a model getter).
    $GLOBALS['harness']['ci']->db->query('CREATE TABLE IF NOT EXISTS tblnotes (id INTEGER PRIMARY KEY, rel_id TEXT, rel_type TEXT, description TEXT, date_contacted TEXT, addedfrom TEXT, dateadded TEXT)');
    $GLOBALS['harness']['ci']->db->query('CREATE TABLE IF NOT EXISTS tbltaskstimers (id INTEGER PRIMARY KEY, task_id TEXT, start_time TEXT, end_time TEXT, staff_id TEXT, hourly_rate TEXT, note TEXT)');
    $GLOBALS['harness']['ci']->db->query('CREATE TABLE IF NOT EXISTS tbltask_checklist_items (id INTEGER PRIMARY KEY, taskid TEXT, description TEXT, finished TEXT, dateadded TEXT, addedfrom TEXT)');
    if (!defined('PERFEX_WEBHOOKS_MODULE_NAME')) {
        require HARNESS_MODULE_DIR . '/perfex_webhooks.php';
    } else {
        \PerfexWebhooks\Module::boot(HARNESS_MODULE_DIR . '/hook_map.php');
    }
    ($GLOBALS['harness']['activation']['perfex_webhooks'])();
    foreach ($options as $name => $value) {
        update_option($name, $value);
    }
    return $GLOBALS['harness']['ci'];
}

function harness_uninstall(): void
{
    ($GLOBALS['harness']['uninstall']['perfex_webhooks'])();
}

function harness_log(): array
{
    return $GLOBALS['harness']['log'];
}
